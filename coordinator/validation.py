"""Client requests into admitted work: parse the wire bytes, check every
field, tokenize, check the context length.

Every problem is a `ValueError` (or an `InvalidRequest` from parsing) whose
message starts with the field's name in the request (`prompt: ...`,
`sampling.top_p ...`), ready for INVALID_ARGUMENT. Must not route, stream
or hold per-request state; imports only the pure tokenizer, no model code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from google.protobuf.message import DecodeError

from shardline.coordinator.cluster_config import LimitsConfig
from shardline.proto import shardline_pb2 as pb
from shardline.worker.proto_convert import sampling_params_from_proto, sampling_params_to_proto
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.tokenizer import Tokenizer

MAX_REQUEST_ID_CHARS = 256
_TOKENIZE_IN_THREAD_CHARS = 64 << 10  # longer prompts are tokenized off the event loop
# GenerateRequest's string fields by field number, and SamplingOptions' (field 6) `stop` (10).
_STRING_FIELDS = {1: "request_id", 2: "model", 3: "prompt"}
_SAMPLING_FIELD, _STOP_FIELD = 6, 10


@dataclass(frozen=True)
class InvalidRequest:
    """What the deserializer returns for bytes protobuf refuses (bad UTF-8 in a string field)."""

    message: str


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: pb.SamplingOptions  # `params` with every field set, the drawn seed included
    priority: int


def parse_generate_request(data: bytes) -> pb.GenerateRequest | InvalidRequest:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        field = _invalid_utf8_field(data)
        if field is not None:
            return InvalidRequest(f"{field}: not valid UTF-8")
        return InvalidRequest("request: not a valid GenerateRequest message")


def load_tokenizer(model: str) -> Tokenizer:
    """The cluster model's tokenizer ("default": the embedded model's GGUF metadata)."""
    if model == "default":
        from shardline.models.default_model import default_model_path  # tokenizer metadata only
        return Tokenizer.from_gguf(default_model_path())
    path = Path(model)
    return Tokenizer.from_folder(path) if path.is_dir() else Tokenizer.from_gguf(path)


class RequestPreparer:
    def __init__(self, served_model_name: str, limits: LimitsConfig, tokenizer: Tokenizer | None):
        self._served_model_name = served_model_name
        self._limits = limits
        self._tokenizer = tokenizer

    async def prepare(self, request: pb.GenerateRequest, max_model_len: int | None) -> PreparedRequest:
        """`max_model_len`: the cluster's context (None: not known yet, not checked)."""
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id: at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
        if request.model and request.model != self._served_model_name:
            raise ValueError(f"model: unknown model {request.model!r}; this cluster serves "
                             f"{self._served_model_name!r}")
        params = sampling_params_from_proto(request.sampling, self._limits.default_max_tokens,
                                            self._limits.max_tokens)
        prompt_ids = await self._prompt_ids(request)
        params = self._fit_context(len(prompt_ids), params, request.sampling.HasField("max_tokens"), max_model_len)
        return PreparedRequest(request_id, prompt_ids, params, sampling_params_to_proto(params), request.priority)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise ValueError("prompt: missing; set prompt or prompt_token_ids")
        if which == "prompt_token_ids":
            if request.chat:
                raise ValueError("chat: needs a text prompt, not prompt_token_ids")
            if not request.prompt_token_ids.ids:
                raise ValueError("prompt_token_ids: must hold at least one token id")
            return list(request.prompt_token_ids.ids)
        if not request.prompt:
            raise ValueError("prompt: must not be empty")
        if self._tokenizer is None:
            raise ValueError("prompt: this cluster's model has no tokenizer; send prompt_token_ids")
        if len(request.prompt) > _TOKENIZE_IN_THREAD_CHARS:
            ids = await asyncio.to_thread(self._encode, request.prompt, request.chat)
        else:
            ids = self._encode(request.prompt, request.chat)
        if not ids:
            raise ValueError("prompt: tokenizes to no tokens")
        return ids

    def _encode(self, prompt: str, chat: bool) -> list[int]:
        if not chat:
            return self._tokenizer.encode(prompt)
        try:
            text = self._tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True)
        except Exception as err:  # a template that raises is the request's problem only when chat is asked
            raise ValueError(f"chat: the model's chat template failed: {err}") from None
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _fit_context(self, num_prompt_tokens: int, params: SamplingParams, max_tokens_set: bool,
                     max_model_len: int | None) -> SamplingParams:
        """An unset max_tokens shrinks to the context left; an explicit one that does not fit is an error."""
        if max_model_len is None:
            return params
        if num_prompt_tokens >= max_model_len:
            raise ValueError(f"prompt: {num_prompt_tokens} tokens leave no room in the context of "
                             f"{max_model_len} tokens")
        room = max_model_len - num_prompt_tokens
        if params.max_tokens <= room:
            return params
        if max_tokens_set:
            raise ValueError(f"sampling.max_tokens: prompt ({num_prompt_tokens} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds the context of {max_model_len} tokens")
        return dataclasses.replace(params, max_tokens=room)


def _invalid_utf8_field(data: bytes) -> str | None:
    """Names the string field whose bytes are not UTF-8 (protobuf's error does not)."""
    try:
        for number, payload in _length_delimited(data):
            if number in _STRING_FIELDS and not _is_utf8(payload):
                return _STRING_FIELDS[number]
            if number == _SAMPLING_FIELD:
                for inner, text in _length_delimited(payload):
                    if inner == _STOP_FIELD and not _is_utf8(text):
                        return "sampling.stop"
    except IndexError:
        return None
    return None


def _length_delimited(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of each length-delimited field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise IndexError("truncated field")
            yield number, data[pos:pos + length]
            pos += length
        else:
            raise IndexError(f"wire type {wire_type} does not occur in these messages")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
