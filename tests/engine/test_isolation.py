"""One bad request never hurts another (issue 13): admission refuses what the sampler cannot
honour; a row whose output fails ends alone; a dead engine thread answers at once."""

import math
import threading

import pytest
import torch

from engine_helpers import Collector, greedy, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.engine.requests import RequestError, SamplingParams
from tritonkv.engine.sampler import sample_batch


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_checkpoint("llama", path)
    return path


@pytest.mark.parametrize("field, value, named", [
    ("temperature", math.nan, "temperature"), ("temperature", math.inf, "temperature"),
    ("temperature", -1.0, "temperature"), ("top_p", math.nan, "top_p"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("top_k", -3, "top_k"), ("seed", 10**23, "seed"), ("seed", -1, "seed"),
])
def test_admission_names_the_bad_sampling_value(llama, field, value, named):
    engine = make_engine(llama)
    with pytest.raises(RequestError, match=named):
        engine.validate([1, 2, 3], SamplingParams(max_tokens=4, **{field: value}))


def test_a_tiny_temperature_is_greedy():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    out = sample_batch(logits, [SamplingParams(max_tokens=1, temperature=1e-45)] * 3, [None] * 3)
    assert out == logits.argmax(-1).tolist()


def test_the_largest_seed_is_served(llama):
    engine = make_engine(llama)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=2**64 - 1)
    engine.validate([1, 2, 3], params)
    c = Collector()
    engine.submit("s", [1, 2, 3], params, c, start=True, end=True)
    engine.run_until_idle()
    assert c.final.finish_reason == "length" and len(c.token_ids) == 4


def test_a_failing_row_ends_alone(llama, monkeypatch):
    engine = make_engine(llama)
    bad, good = Collector(), Collector()
    engine.submit("bad", [1, 5, 6], greedy(6), bad, start=True, end=True)
    engine.submit("good", [1, 5, 6], greedy(6), good, start=True, end=True)
    engine._drain()
    seq = next(s for s in engine._seqs.values() if s.seq_id == 1)  # "bad", submitted first

    def explode(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    engine.step()  # prefill of both
    seq.turn.emit.text.push = explode  # the turn's TextStream (engine/output.py)
    engine.run_until_idle()
    assert bad.final.finish_reason == "error" and "output failed" in bad.final.error
    assert good.final.finish_reason == "length" and len(good.token_ids) == 6
    assert engine.pool.counts()["used"] == 0


def test_a_dead_engine_thread_answers_at_once(llama, monkeypatch):
    engine = make_engine(llama)

    def die():
        raise SystemError("boom")

    monkeypatch.setattr(engine, "_expire_idle", die)
    first = Collector()
    done = threading.Event()
    engine.submit("a", [1, 5, 6], greedy(30), lambda out: (first(out), out.finished and done.set()),
                  start=True, end=True)
    engine.start_loop()
    assert done.wait(10)
    assert first.final.finish_reason == "error" and "engine stopped" in first.final.error
    assert engine.failure == "SystemError: boom"
    later = Collector()
    engine.submit("b", [1, 5, 6], greedy(3), later, start=True, end=True)  # answered in submit
    assert later.final.finish_reason == "error" and "failed" in later.final.error
    engine.stop_loop()
