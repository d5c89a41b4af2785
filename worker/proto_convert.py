"""Conversions between protobuf messages and the engine's own types.

Shared by the coordinator (which validates client requests) and the
worker (which validates again at its own boundary). A bad field raises
`ValueError` whose message starts with the field's name in the request
(`sampling.top_p must be in (0, 1], got 1.5`), ready for INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

from shardline.proto import shardline_pb2 as pb
from shardline.worker.sampling_params import SamplingParams

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def sampling_params_from_proto(options: pb.SamplingOptions, default_max_tokens: int,
                               max_tokens_limit: int) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; max_tokens
    defaults to `default_max_tokens` and may not exceed `max_tokens_limit`."""
    values: dict = {}
    for name in ("max_tokens", "top_k", "seed", *_FLOAT_FIELDS):
        if options.HasField(name):
            values[name] = getattr(options, name)
    for name in _FLOAT_FIELDS:
        if name in values and not math.isfinite(values[name]):
            raise ValueError(f"sampling.{name} must be a finite number, got {values[name]}")
    values.setdefault("max_tokens", default_max_tokens)
    if values["max_tokens"] > max_tokens_limit:
        raise ValueError(f"sampling.max_tokens must be at most {max_tokens_limit}, got {values['max_tokens']}")
    try:
        return SamplingParams(**values, stop=tuple(options.stop), stop_token_ids=tuple(options.stop_token_ids),
                              ignore_eos=options.ignore_eos, logprobs=options.logprobs)
    except ValueError as err:
        raise ValueError(f"sampling.{err}") from None


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    """Every field set explicitly, so the receiver needs no defaults (and the
    seed, drawn once, stays the same on a retry)."""
    return pb.SamplingOptions(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        seed=params.seed, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, logprobs=params.logprobs)


def finish_reason_to_proto(reason: str | None) -> int:
    """"error" has no client-facing reason: errors travel as gRPC status."""
    return _FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def logprobs_to_proto(token_id: int, entry: dict[int, float]) -> pb.TokenLogprobs:
    top = sorted(entry.items(), key=lambda item: -item[1])
    return pb.TokenLogprobs(token_id=token_id, logprob=entry[token_id],
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])


def logprobs_from_proto(proto: pb.TokenLogprobs) -> dict[int, float]:
    """The inverse of logprobs_to_proto."""
    return {**{t.token_id: t.logprob for t in proto.top}, proto.token_id: proto.logprob}
