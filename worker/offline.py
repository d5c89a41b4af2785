"""Local, in-process text generation: load a model and its tokenizer, then
stream the continuation of one prompt as text deltas.

What the CLI's `generate` runs when no server is named. Serving many
requests at once is the engine's job, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shardline.kernels.backend import Backend, create_backend
from shardline.models.default_model import default_model_path
from shardline.models.loader import load_model
from shardline.parallel.pipeline import StagePlacement
from shardline.parallel.experts import ExpertParallel
from shardline.parallel.sharding import TensorParallel
from shardline.worker.generate import generate
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.tokenizer import DetokenizeStream, Tokenizer


@dataclass(frozen=True)
class LocalModel:
    model: Any
    tokenizer: Tokenizer | None  # None: token ids in and out, no text


def load_local(model_path: str | Path | None = None, backend: str | Backend = "auto",
               dtype: str | None = None, show_progress: bool = True,
               tp: TensorParallel = TensorParallel(), placement: StagePlacement = StagePlacement(),
               ep: ExpertParallel = ExpertParallel()) -> LocalModel:
    """`backend` is a name (a backend is created) or a ready Backend (a
    group's rank, already on its GPU); `tp` and `placement` load this rank's shard."""
    path = Path(model_path) if model_path else default_model_path()
    if isinstance(backend, str):
        backend = create_backend(backend, dtype)
    loaded = load_model(path, backend, show_progress, tp, placement, ep)
    if path.is_dir():
        tokenizer = Tokenizer.from_folder(path)
    else:
        tokenizer = Tokenizer.from_gguf(loaded.checkpoint)
    return LocalModel(loaded.model, tokenizer)


def prompt_ids(local: LocalModel, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = local.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True)
        return local.tokenizer.encode(text, add_special_tokens=False)
    return local.tokenizer.encode(prompt)


def stream_text(local: LocalModel, prompt: str, params: SamplingParams, chat: bool = False) -> Iterator[str]:
    """Yields the continuation (never the prompt) as it is generated."""
    ids = prompt_ids(local, prompt, chat)
    eos = local.tokenizer.eos_token_ids | set(local.model.config.eos_token_ids)
    detok = DetokenizeStream(local.tokenizer)
    for token in generate(local.model, ids, params, sorted(eos)):
        delta = detok.push(token)
        if delta:
            yield delta
    tail = detok.flush()
    if tail:
        yield tail
