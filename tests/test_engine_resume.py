"""A request resumed with `output_token_ids` (tokens another group already
streamed) continues exactly like the uninterrupted request: the same tokens
after them, and text deltas that pick up where the streamed text ended."""

from __future__ import annotations

import pytest

from shardline.models.default_model import default_model_path
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.offline import load_local
from shardline.worker.sampling_params import SamplingParams

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def engine():
    local = load_local(default_model_path(), backend="numpy", show_progress=False)
    return LLMEngine(EngineConfig(num_kv_blocks=128, block_size_tokens=16), local)


def run(engine: LLMEngine, request_id: str, params: SamplingParams, output_token_ids=()) -> list:
    """Every output of one request: (token ids, text delta, finish reason)."""
    engine.add_request(request_id, PROMPT, params, output_token_ids=output_token_ids)
    outputs = []
    while not outputs or outputs[-1][2] is None:   # a request may finish before any step
        outputs += [(out.new_token_ids, out.text, out.finish_reason) for out in engine.step()]
    assert not engine.has_unfinished()
    engine.scheduler.check_integrity()
    return outputs


def joined(outputs: list) -> tuple[list[int], str]:
    return [t for ids, _, _ in outputs for t in ids], "".join(text for _, text, _ in outputs)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, temperature=0.0),
    SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234),
], ids=["greedy", "seeded"])
def test_resume_continues_like_the_uninterrupted_request(engine, params):
    full = run(engine, "full", params)
    tokens, text = joined(full)
    for num_streamed in (1, 7, 15):
        resumed = run(engine, f"resumed-{num_streamed}", params, output_token_ids=tokens[:num_streamed])
        resumed_tokens, resumed_text = joined(resumed)
        assert resumed_tokens == tokens[num_streamed:]
        assert joined(full[:num_streamed])[1] + resumed_text == text
        assert resumed[-1][2] == full[-1][2] == "length"   # the streamed tokens count toward max_tokens


def test_resume_with_a_stop_string_held_back(engine):
    """Text held back while it might start a stop string comes out after the resume;
    streamed tokens that already hold the stop string finish the request at once."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    probe_tokens, probe_text = joined(run(engine, "probe", greedy))
    head = engine.tokenizer.decode(probe_tokens[:12])
    stop = probe_text[len(head) - 3:len(head) + 3]   # spans tokens, so its head is held back
    assert probe_text.find(stop) == len(head) - 3
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))
    full = run(engine, "stop-full", params)
    tokens, text = joined(full)
    assert full[-1][2] == "stop" and text == probe_text[:len(head) - 3]
    for num_streamed in (3, len(tokens) - 1):
        resumed = run(engine, f"stop-resumed-{num_streamed}", params, output_token_ids=tokens[:num_streamed])
        resumed_tokens, resumed_text = joined(resumed)
        assert resumed_tokens == tokens[num_streamed:]
        assert joined(full[:num_streamed])[1] + resumed_text == text
        assert resumed[-1][2] == "stop"
    done = run(engine, "stop-done", params, output_token_ids=tokens)
    assert done == [([], "", "stop")]


def test_resume_rejects_bad_output_tokens(engine):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="output_token_ids"):
        engine.add_request("bad-ids", PROMPT, params, output_token_ids=[engine.local.model.config.vocab_size])
    with pytest.raises(ValueError, match="output_token_ids"):
        engine.add_request("too-many", PROMPT, params, output_token_ids=[1, 2, 3, 4])
    assert not engine.has_unfinished()
