"""Conversation rules of the engine: turn order, START/END, idle expiry, cancel, bad input."""

import time

import pytest

from engine_helpers import Collector, greedy, make_engine, run_turn
from tiny_models import build_tiny_checkpoint, hf_greedy
from tritonkv.config import EngineConfig
from tritonkv.engine.requests import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, build_tiny_checkpoint("llama", path)


def test_next_turn_delivered_while_previous_streams_runs_after_it(tiny):
    path, hf = tiny
    engine = make_engine(path)
    first, second = Collector(), Collector()
    p1, p2 = [1, 10, 11, 12, 13, 14], [20, 21]
    engine.submit("c", p1, greedy(5), first, start=True, end=False)
    engine.submit("c", p2, greedy(5), second, start=False, end=True)  # arrives before turn 1 ran
    engine.run_until_idle()
    out1 = hf_greedy(hf, p1, 5)[0]
    assert first.token_ids == out1
    assert second.token_ids == hf_greedy(hf, p1 + out1 + p2, 5)[0]
    assert engine.pool.counts()["used"] == 0 and engine.stats()["live_sequences"] == 0


def test_start_twice_and_unknown_sequence_are_errors_and_keep_blocks(tiny):
    engine = make_engine(tiny[0])
    run_turn(engine, "a", [1, 5, 6, 7, 8], 3, start=True, end=False)
    used = engine.pool.counts()["used"]
    assert used == 2  # 5 prompt + 3 sampled tokens; the last sampled has no KV yet: 7 -> two blocks of 4
    again = run_turn(engine, "a", [9], 3, start=True, end=False)
    assert "already live" in again.final.error and again.final.finish_reason == "error"
    unknown = run_turn(engine, "zzz", [9], 3, start=False, end=False)
    assert "is not live" in unknown.final.error
    assert engine.pool.counts()["used"] == used
    closed = Collector()
    engine.submit("a", [], greedy(1), closed, start=False, end=True, close_only=True)
    engine.run_until_idle()
    assert closed.final.finish_reason == "closed"
    assert engine.pool.counts()["used"] == 0


def test_rejected_request_with_end_still_closes_the_conversation(tiny):
    engine = make_engine(tiny[0])
    run_turn(engine, "b", [1, 5, 6, 7, 8, 9], 3, start=True, end=False)
    bad = Collector()
    engine.submit("b", [], greedy(1), bad, start=False, end=True, error="token id 999 is outside")
    engine.run_until_idle()
    assert bad.final.error == "token id 999 is outside"
    assert engine.stats()["live_sequences"] == 0 and engine.pool.counts()["used"] == 0


def test_idle_conversation_expires_and_frees_its_blocks(tiny):
    engine = make_engine(tiny[0], sequence_idle_timeout_s=0.05)
    run_turn(engine, "idle", [1, 5, 6, 7, 8, 9], 3, start=True, end=False)
    assert engine.pool.counts()["used"] > 0
    time.sleep(0.1)
    engine._expire_idle()
    assert engine.pool.counts()["used"] == 0
    late = run_turn(engine, "idle", [5], 2, start=False, end=False)
    assert "is not live" in late.final.error


def test_cancel_stops_the_turn_and_releases_the_conversation(tiny):
    engine = make_engine(tiny[0])
    c = Collector()
    engine.submit("x", [1, 5, 6, 7], greedy(50), c, start=True, end=False,
                  is_cancelled=lambda: len(c.outputs) >= 3)
    engine._drain()
    for _ in range(200):
        engine._last_cancel_poll = 0.0  # poll on every step
        engine.step()
        if c.outputs and c.outputs[-1].finished:
            break
    assert c.final.finish_reason == "cancelled"
    assert 3 <= len(c.token_ids) < 50
    assert engine.pool.counts()["used"] == 0 and engine.stats()["live_sequences"] == 0


def test_context_limit_is_enforced_with_a_clear_message(tiny):
    engine = make_engine(tiny[0], max_model_len=32)
    with pytest.raises(ValueError, match="exceeds the context limit of 32"):
        engine.validate([1, 2, 3], SamplingParams(max_tokens=33))
    long = run_turn(engine, "l", list(range(3, 40)), 2, start=True, end=True)
    assert "at most 32" in long.final.error
    # generation stops at the limit with finish_reason "length"
    c = run_turn(engine, "m", list(range(3, 28)), 30, start=True, end=True)
    assert c.final.finish_reason == "length" and len(c.token_ids) == 32 - 25


def test_validation_messages_name_the_problem(tiny):
    engine = make_engine(tiny[0])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.validate([], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="token id 96 is outside the vocabulary"):
        engine.validate([1, 96], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        engine.validate([1], SamplingParams(max_tokens=0))


def test_a_failing_step_answers_with_an_error_and_the_engine_keeps_serving(tiny, monkeypatch):
    engine = make_engine(tiny[0])
    real_launch = engine.runner.launch
    calls = {"n": 0}

    def flaky(rows, prev=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_launch(rows, prev)

    monkeypatch.setattr(engine.runner, "launch", flaky)
    engine.start_loop()
    try:
        c, ok = Collector(), Collector()
        engine.submit("f", [1, 5, 6], greedy(3), c, start=True, end=False)
        wait_final(c)
        assert "internal error in engine step: boom" in c.final.error
        engine.submit("g", [1, 5, 6], greedy(3), ok, start=True, end=True)
        wait_final(ok)
    finally:
        engine.stop_loop()
    assert ok.final.finish_reason == "length" and len(ok.token_ids) == 3
    assert engine.pool.counts()["used"] == 0 and engine.stats()["live_sequences"] == 0


def wait_final(c, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (c.outputs and c.outputs[-1].finished):
        assert time.monotonic() < deadline, "no final response"
        time.sleep(0.01)


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="'block_size'"):
        EngineConfig.from_parameters({"block_size": "12"})
    with pytest.raises(ValueError, match="unknown parameter 'blok_size'"):
        EngineConfig.from_parameters({"blok_size": "16"})
    with pytest.raises(ValueError, match="'max_num_seqs' = 'many': expected int"):
        EngineConfig.from_parameters({"max_num_seqs": "many"})
    assert EngineConfig.from_parameters({"enable_prefix_caching": "false"}).enable_prefix_caching is False


def test_stats_count_the_blocks_preemption_released(tiny):
    """A pool of 4 blocks of 4 tokens, no prefix cache, two 7-token prompts that each grow to
    16 tokens (4 blocks): once both prompts hold their 2 blocks, the one whose turn started
    last is preempted once, holding 2 blocks, and recomputed after the other ends."""
    path, hf = tiny
    engine = make_engine(path, num_blocks=4, enable_prefix_caching=False)
    cs = [Collector(), Collector()]
    for i in range(2):
        engine.submit(i, [1] + [10 + 7 * i + j for j in range(6)], greedy(9), cs[i], start=True, end=True)
    engine.run_until_idle()
    stats = engine.stats()
    assert (stats["preemptions"], stats["preempted_blocks"]) == (1, 2)
    assert [len(c.token_ids) for c in cs] == [9, 9] and stats["used"] == 0
