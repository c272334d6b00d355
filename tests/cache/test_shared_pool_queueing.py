"""When another instance of a shared pool holds every block, a turn queues (no error, no
crash) and runs once that instance releases them."""

import multiprocessing as mp
import time

import pytest

from engine_helpers import Collector, greedy
from engine_workers import engine_settings, hold_every_block, turn
from polling import wait_until
from tritonkv.engine.factory import build_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

CTX = mp.get_context("spawn")
PROMPT = [256, 65, 66, 67, 68, 69]  # 2 blocks of 4


@pytest.fixture(scope="module")
def checkpoint():
    return ensure_demo_checkpoint()


def test_turn_waits_for_blocks_held_by_another_instance(checkpoint, pool_name):
    a = build_engine(engine_settings(checkpoint, pool_name))
    results, release = CTX.Queue(), CTX.Event()
    b = CTX.Process(target=hold_every_block, args=(checkpoint, pool_name, results, release), daemon=True)
    b.start()
    try:
        held = results.get(timeout=120)
        assert held == {"used": a.pool.num_blocks}, held
        a.start_loop()
        c = Collector()
        a.submit("q", PROMPT, greedy(5), c, start=True, end=True)
        time.sleep(1.0)
        assert c.outputs == [] and a.failure is None  # queued: nothing answered, nothing failed
        release.set()
        assert results.get(timeout=60) == {"used": 0}
        assert wait_until(lambda: c.outputs and c.outputs[-1].finished, 30)
        assert c.final.error is None and c.final.cached_tokens == 0
        assert c.token_ids == turn(build_engine(engine_settings(checkpoint, "")), "p", PROMPT, 5)[0]
    finally:
        release.set()
        b.join(30)
        if b.is_alive():
            b.kill()
        a.stop_loop()
        a.close()
