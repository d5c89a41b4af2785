"""Text <-> token ids for the group leader, through the `tokenizers` library.

`Tokenizer` is built from an HF folder (tokenizer.json and friends) or from
the vocabulary a GGUF file carries; it encodes prompts, decodes outputs,
renders chat templates (sandboxed jinja2) and knows the end-of-generation
ids. `DetokenizeStream` turns generated ids into text deltas that are always
whole UTF-8 characters.

It must not import transformers or torch (the leader runs without them), and
it holds no per-request state other than inside a `DetokenizeStream`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from shardline.models.errors import ModelLoadError
from shardline.models.gguf import GGUFCheckpoint, GGUFTokenizerData

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_STYLE = ("default", "gpt2")
_SPLIT_THEN_BYTES = {
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
}
SUPPORTED_GGUF_PRE_TOKENIZERS = (*_GPT2_STYLE, "smollm", *_SPLIT_THEN_BYTES)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# Control tokens llama.cpp also treats as end of generation, whatever the file's eos id says.
_END_OF_GENERATION_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
    "<end_of_turn>", "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>",
})


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the model's config says about special tokens."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: frozenset[int],
        chat_template: str | None,
        template_tokens: dict[str, str],
    ):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._template_tokens = template_tokens  # bos_token, eos_token, ... for chat templates

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(tokenizer_file, "no such file (a tokenizer folder needs tokenizer.json)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(tokenizer_file, f"unreadable tokenizer: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        tokens = {
            name: _token_content(config.get(name) or special_map.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        # Like transformers: the config's add_bos/add_eos flags win over tokenizer.json's post-processor.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            _set_bos_eos(backend, tokens["bos_token"] if config.get("add_bos_token") else None,
                         tokens["eos_token"] if config.get("add_eos_token") else None)
        eos_ids = _as_id_list(generation.get("eos_token_id"))
        if tokens["eos_token"] is not None and backend.token_to_id(tokens["eos_token"]) is not None:
            eos_ids.append(backend.token_to_id(tokens["eos_token"]))
        return cls(
            backend, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
            eos_token_ids=frozenset(eos_ids), chat_template=_folder_chat_template(folder, config),
            template_tokens={k: v for k, v in tokens.items() if v is not None},
        )

    @classmethod
    def from_gguf(cls, checkpoint_or_path: GGUFCheckpoint | str | Path) -> Tokenizer:
        checkpoint = checkpoint_or_path
        if not isinstance(checkpoint, GGUFCheckpoint):
            checkpoint = GGUFCheckpoint.open(checkpoint_or_path)
        data = checkpoint.tokenizer_data()
        if data.model != "gpt2":
            raise ModelLoadError(
                checkpoint.path, f"tokenizer model {data.model!r} is not supported (supported: gpt2, byte-level BPE)"
            )
        backend = _byte_level_bpe(data, checkpoint.path)

        def token(token_id: int | None) -> str | None:
            return data.tokens[token_id] if token_id is not None and token_id < len(data.tokens) else None

        tokens = {"bos_token": token(data.bos_token_id), "eos_token": token(data.eos_token_id),
                  "unk_token": token(data.unk_token_id), "pad_token": token(data.pad_token_id)}
        special = [AddedToken(t, normalized=False, special=True) for t in tokens.values() if t is not None]
        backend.add_special_tokens(special)
        _set_bos_eos(backend, tokens["bos_token"] if data.add_bos_token else None,
                     tokens["eos_token"] if data.add_eos_token else None)
        return cls(
            backend, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
            eos_token_ids=_gguf_end_of_generation_ids(data), chat_template=data.chat_template,
            template_tokens={k: v for k, v in tokens.items() if v is not None},
        )

    # -- use --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS only where the model's tokenizer config asks for them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """The prompt text for `messages`, rendered like transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self._template_tokens, **template_kwargs},
        )


class DetokenizeStream:
    """Generated ids in, text deltas out; a multi-byte character is held back until it is whole.

    Decodes a short window of recent ids twice (with and without the ids not
    yet emitted) and returns the difference, as vLLM's incremental
    detokenizer does; the window keeps one emitted chunk as context so
    decoders that strip a leading space see the same start both times.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or a character still waits for its last bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        prefix_text, new_text = self._window_texts()
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _window_texts(self) -> tuple[str, str]:
        decode = functools.partial(self._tokenizer.decode, skip_special_tokens=self._skip_special_tokens)
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = decode(self._ids[self._prefix_offset:])
        return prefix_text, new_text


# -- GGUF vocabularies -------------------------------------------------------------


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE spells every token with these."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    spare = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(spare)
            spare += 1
    return table


def _byte_level_bpe(data: GGUFTokenizerData, path: Path) -> BackendTokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        # A token outside the byte alphabet (a mislabelled control token) is respelled byte by byte.
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): index for index, token in enumerate(data.tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in data.merges]
    try:
        backend = BackendTokenizer(models.BPE(
            vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False,
        ))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise ModelLoadError(path, f"tokenizer vocabulary/merges are inconsistent: {e}") from e
    backend.pre_tokenizer = _gguf_pre_tokenizer(data.pre or "default", path)
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(data.tokens, data.token_types))
    # Control tokens never come from splitting text; llama.cpp matches them (and user-defined ones) whole.
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, kind in typed if kind == _CONTROL and set(token) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False) for token, kind in typed if kind == _USER_DEFINED
    ])
    return backend


def _gguf_pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    if pre in _GPT2_STYLE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # each digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _SPLIT_THEN_BYTES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ModelLoadError(
        path, f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_PRE_TOKENIZERS)})"
    )


def _gguf_end_of_generation_ids(data: GGUFTokenizerData) -> frozenset[int]:
    ids = {i for i in (data.eos_token_id, data.eot_token_id, data.eom_token_id) if i is not None}
    ids.update(
        index for index, (token, kind) in enumerate(zip(data.tokens, data.token_types))
        if kind == _CONTROL and token in _END_OF_GENERATION_TEXTS
    )
    return frozenset(ids)


def _set_bos_eos(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """Make `encode(add_special_tokens=True)` add exactly these (None: nothing)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# -- HF folders -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(path, f"unreadable JSON: {e}") from e


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (where recent transformers save it), else chat_template.json or tokenizer_config."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


# -- chat templates -------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used for training masks) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
