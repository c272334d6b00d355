"""Two engines in two processes on one pool: a prefix computed by one is a hit for the other,
outputs equal a private engine's, weights are one shared copy, a killed instance leaks nothing."""

import multiprocessing as mp
import os
import signal

import pytest

from engine_workers import engine_settings, second_instance, turn, weights_mapped_from_pool_file
from polling import wait_until
from tritonkv.cache.pool_file import pool_path
from tritonkv.engine.factory import build_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

CTX = mp.get_context("spawn")
SYSTEM = [256] + list(range(40, 40 + 37))  # 38 tokens: 9 full blocks of 4
SALT = (("cache_salt", "tenant-1"),)


@pytest.fixture(scope="module")
def checkpoint():
    return ensure_demo_checkpoint()


def test_prefix_from_one_process_is_a_hit_in_the_other(checkpoint, pool_name):
    a = build_engine(engine_settings(checkpoint, pool_name))
    assert a.pool.created and a.pool.owner == 0 and weights_mapped_from_pool_file(a)
    first, cached = turn(a, "sys", SYSTEM + [65, 66, 67], 6)
    assert cached == 0
    salted, cached = turn(a, "salted", SYSTEM + [68], 6, extra_keys=SALT)
    assert cached == 0  # the unsalted system prompt is cached, but not in tenant-1's namespace
    prompts = [(SYSTEM + [70, 71], ()),  # the system prompt A computed: 9 blocks hit
               (SYSTEM + [70, 71], (("cache_salt", "tenant-2"),)),  # other tenant: no hit
               (SYSTEM + [68], SALT)]  # A's tenant-1 prefix
    results, kill_me = CTX.Queue(), CTX.Event()
    b = CTX.Process(target=second_instance, args=(checkpoint, pool_name, prompts, results, kill_me), daemon=True)
    b.start()
    try:
        out = results.get(timeout=120)
        assert "error" not in out, out
        assert (out["owner"], out["created"], out["weights_shared"]) == (1, False, True)
        assert [c for _, c in out["turns"]] == [36, 0, 36]
        assert out["turns"][2][0] == salted  # B continues from A's tenant-1 blocks
        # same tokens as a private engine computing everything itself
        private = build_engine(engine_settings(checkpoint, ""))
        for (ids, cached), (prompt, keys) in zip(out["turns"], prompts):
            assert ids == turn(private, "p", prompt, 6, extra_keys=keys)[0]
        assert a.pool.counts()["used"] == out["used_while_holding"] > 0
        os.kill(b.pid, signal.SIGKILL)
        b.join(30)
        # A's reclaim timer drops the dead instance's references; A keeps serving
        assert wait_until(lambda: a.pool.counts()["used"] == 0, 10)
        again, cached = turn(a, "after", SYSTEM + [65, 66, 67], 6)
        assert again == first and cached == 40  # its whole earlier prompt (10 blocks) is cached
        assert a.pool.counts()["owners"] == 1 and a.pool.counts()["used"] == 0
    finally:
        if b.is_alive():
            b.kill()
            b.join(10)
        a.close()
    assert not os.path.exists(pool_path(f"{pool_name}-cpu0", "pool"))
