"""The embedded SmolLM2-135M-Instruct GGUF: our greedy continuations equal
HF transformers' greedy continuations loaded from the same file, token for
token, and the chat model answers a simple question correctly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shardline.models.default_model import default_model_path
from shardline.worker.generate import generate
from shardline.worker.offline import load_local, prompt_ids, stream_text
from shardline.worker.sampling_params import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "Water boils at a temperature of",
    "Here is a short poem about the sea:\n",
]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def ours():
    return load_local(default_model_path(), backend="numpy", show_progress=False)


@pytest.fixture(scope="module")
def hf_model():
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def hf_greedy(model, ids: list[int], eos: set[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, do_sample=False,
                             eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    tokens = out[0, len(ids):].tolist()
    for i, t in enumerate(tokens):  # HF pads after EOS
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_hf(ours, hf_model, prompt, chat):
    ids = prompt_ids(ours, prompt, chat)
    eos = set(ours.tokenizer.eos_token_ids)
    mine = list(generate(ours.model, ids, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0), sorted(eos)))
    assert mine == hf_greedy(hf_model, ids, eos)


def test_chat_answers_paris(ours):
    text = "".join(stream_text(ours, "What is the capital of France?",
                               SamplingParams(max_tokens=24, temperature=0.0), chat=True))
    assert "Paris" in text


def test_seeded_sampling_is_reproducible(ours):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    first = "".join(stream_text(ours, "Once upon a time", params))
    assert first == "".join(stream_text(ours, "Once upon a time", params))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.client.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_streams_continuation_only():
    result = run_cli("generate", "--backend", "numpy", "--chat", "--max-tokens", "16",
                     "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "capital of France?" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: not found"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be at least 1"),
])
def test_cli_bad_input_is_a_clear_error(args, message):
    result = run_cli("generate", "--backend", "numpy", *args, "hello")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
