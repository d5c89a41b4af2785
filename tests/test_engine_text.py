"""The engine with the embedded SmolLM2 and its tokenizer: paged, batched
generation equals the contiguous single-sequence path; stop strings that
span tokens cut the text; logprobs match teacher-forced log-softmax."""

from __future__ import annotations

import numpy as np
import pytest

from shardline.models.default_model import default_model_path
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.generate import generate, prompt_logits
from shardline.worker.offline import load_local
from shardline.worker.sampling_params import SamplingParams

PROMPTS = ["The three primary colors are", "def fibonacci(n):", "Water boils at", "Once upon a time"]


@pytest.fixture(scope="module")
def engine():
    local = load_local(default_model_path(), backend="numpy", show_progress=False)
    return LLMEngine(EngineConfig(num_kv_blocks=256, block_size_tokens=16), local)


def test_batched_paged_equals_single_sequence(engine):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    batched = engine.generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, batched):
        ids = engine.tokenizer.encode(prompt)
        alone = list(generate(engine.local.model, ids, params, sorted(engine.eos_token_ids)))
        assert completion.token_ids == alone
        assert completion.text == engine.tokenizer.decode(alone)


def test_stop_string_spanning_tokens_cuts_text(engine):
    prompt = PROMPTS[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    ids = full.token_ids
    # A stop string made of the tail of token 4 and the head of token 5's text.
    head = engine.tokenizer.decode(ids[:4])
    joined = engine.tokenizer.decode(ids[:6])
    stop = joined[len(head) - 2:len(head) + 3]
    assert stop in full.text
    stopped = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]


def test_logprobs_match_teacher_forcing(engine):
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    engine.add_request("lp", prompt_ids, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.logprobs
    logits = prompt_logits(engine.local.model, prompt_ids + tokens).astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    for i, (token, entry) in enumerate(zip(tokens, logprobs)):
        row = ref[len(prompt_ids) - 1 + i]
        assert len(entry) >= 3 and token in entry
        assert max(entry, key=entry.get) == token  # greedy picks the most likely
        for t, value in entry.items():
            assert value == pytest.approx(row[t], abs=1e-4)
