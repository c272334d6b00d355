"""``Engine.abort`` and per-row faults: a stop string found by the caller after the engine
sampled past it takes the extra tokens back (the next turn sees exactly the kept ones); a
fault while building one sequence's step row fails that turn alone."""

import pytest

from engine_helpers import Collector, greedy, make_engine
from tiny_models import build_tiny_checkpoint, hf_greedy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, build_tiny_checkpoint("llama", path)


def steps(engine, n):
    for _ in range(n):
        engine._drain()
        engine.step()


@pytest.mark.parametrize("kept", [2, 4])
def test_stop_keeping_fewer_tokens_takes_the_others_back(tiny, kept):
    path, hf = tiny
    engine = make_engine(path)
    p1, p2 = [1, 10, 11, 12, 13, 14, 15], [20, 21, 22]
    first = Collector()
    engine.submit_turn("c", p1, greedy(10), first, start=True, end=False, request_id="r1")
    while len(first.token_ids) < 5:  # (on CUDA a decode step may be in flight besides)
        steps(engine, 1)
    assert len(first.token_ids) == 5  # KV written for 4 of them (or 5, a step in flight)
    engine.abort("r1", kept_tokens=kept)
    engine.run_until_idle()
    assert first.final.finish_reason == "stop" and first.final.error is None
    second = Collector()
    engine.submit("c", p2, greedy(5), second, start=False, end=True)
    engine.run_until_idle()
    kept_ids = first.token_ids[:kept]
    assert kept_ids == hf_greedy(hf, p1, kept)[0]
    assert second.token_ids == hf_greedy(hf, p1 + kept_ids + p2, 5)[0]
    assert engine.pool.counts()["used"] == 0 and engine.stats()["live_sequences"] == 0


def test_cancel_by_request_id_releases_the_conversation(tiny):
    engine = make_engine(tiny[0])
    c = Collector()
    engine.submit_turn("c", [1, 5, 6], greedy(50), c, start=True, end=False, request_id="r")
    steps(engine, 3)
    engine.abort("r")
    engine.run_until_idle()
    assert c.final.finish_reason == "cancelled"
    assert engine.pool.counts()["used"] == 0 and "c" not in engine._live


def test_a_fault_building_one_row_fails_that_row_alone(tiny):
    path, hf = tiny
    engine = make_engine(path)
    good, bad = Collector(), Collector()
    engine.submit("a", [1, 30, 31, 32], greedy(6), good, start=True, end=False)
    engine.submit("b", [1, 40, 41], greedy(6), bad, start=True, end=False)
    engine._drain()
    planted = engine._live["b"].seq_id
    cache_index = engine.kv.cache_index

    def faulty(seq_id, position):
        if seq_id == planted:
            raise RuntimeError("planted fault")
        return cache_index(seq_id, position)

    engine.kv.cache_index = faulty
    engine.run_until_idle()
    assert "planted fault" in bad.final.error and bad.token_ids == []
    assert good.final.error is None and good.token_ids == hf_greedy(hf, [1, 30, 31, 32], 6)[0]
    assert "b" not in engine._live and engine.kv.block_table(engine._live["a"].seq_id)
    assert engine.pool.counts()["used"] == len(engine.kv.block_table(engine._live["a"].seq_id))
