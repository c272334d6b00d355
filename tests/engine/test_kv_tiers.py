"""The host tier in the engine: conversations whose blocks went to host memory and came back
give the tokens of a full recompute (HF, fp32) and prefill only their new tokens; fp8 / int8
KV swaps losslessly; swapped conversations that are queued, cancelled or ended leak nothing;
streaming / h2o keep their kept blocks across swaps (dense policy reference)."""

import os

import pytest
import torch

from bounded_models import assert_hf_greedy, build_checkpoint, prompt
from dense_policy_reference import DensePolicyReference, reference_turn
from engine_helpers import Collector, greedy, make_engine, run_turn
from tritonkv.cache.allocate import kv_block_bytes
from tritonkv.model.model_config import ModelConfig

BS = 4
HOST = dict(kv_host_memory_gb=0.002)  # ~1000 tiny fp32 blocks (CUDA: pinned, graphs and overlap on)
FAMILIES = {"llama": ("LlamaForCausalLM", {}), "qwen2": ("Qwen2ForCausalLM", {}),
            "mistral_window": ("MistralForCausalLM", {"sliding_window": 8})}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    arch, extra = FAMILIES[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, path, build_checkpoint(path, arch, seed=3, **extra)


def round_robin(engine, names, turns, new_tokens, max_tokens):
    """``turns`` turns of each conversation in ``names``, one conversation at a time, so each
    goes idle while the others run. Returns (history, per turn (name, turn, context,
    collector, whether its blocks were on the host when it arrived))."""
    history = {n: [] for n in names}
    done = []
    for t in range(turns):
        for i, name in enumerate(names):
            new = prompt(new_tokens, seed=100 * t + i)[(1 if t else 0):]
            context = history[name] + new
            parked = t > 0 and engine.kv.swapped(engine._live[name].seq_id)
            c = run_turn(engine, name, new, max_tokens, start=t == 0, end=t == turns - 1)
            done.append((name, t, context, c, parked))
            history[name] = context + c.token_ids
    return history, done


def test_conversations_swapped_to_host_and_back_equal_hf_recompute(family):
    name, path, hf = family
    # 3 conversations of up to 3 x (9 + 8) tokens (13 blocks) in a pool of 16 blocks (the
    # window model holds ~4 blocks per conversation: a pool of 7): later turns find their
    # blocks on the host
    engine = make_engine(path, block_size=BS, num_blocks=7 if name == "mistral_window" else 16, **HOST)
    _, done = round_robin(engine, ["a", "b", "c"], turns=3, new_tokens=9, max_tokens=8)
    for conv, t, context, c, _ in done:
        assert_hf_greedy(hf, context, c.token_ids)
        # everything computed before the turn was restored: only its new tokens (and the
        # last turn's sampled token) were prefilled
        previous = len(context) - (8 if t == 0 else 9 - 1)
        assert c.final.cached_tokens == (0 if t == 0 else previous - 1), (conv, t)
    stats = engine.stats()
    parked = sum(p for *_, p in done)
    assert parked >= 3  # (4 here: the later turns found their blocks on the host)
    assert (stats["preemptions"], stats["swap_ins"], stats["swap_outs"]) == (0, parked, parked)
    # every parked conversation came back: all that went out came in (copied, or taken back
    # where the device still cached it), nothing was dropped
    assert stats["swap_in_blocks"] + stats["swap_in_device_hit_blocks"] == stats["swap_out_blocks"] > 0
    assert stats["host_dropped_blocks"] == 0
    block = kv_block_bytes(engine.model_config, BS, engine.kv_caches[0][0].dtype)
    # bytes count every copy: conversations' blocks and prefix blocks (demoted / loaded)
    assert stats["swap_in_bytes"] == (stats["swap_in_blocks"] + stats["host_prefix_hit_blocks"]) * block
    assert stats["swap_out_bytes"] == (stats["swap_out_blocks"] + stats["demoted_blocks"]) * block
    # every conversation ended: both tiers back to empty
    assert (stats["used"], stats["host_blocks_used"], stats["host_sequences"]) == (0, 0, 0)
    # (demoted prefix blocks stay cached there, as on the device)
    assert stats["host_blocks_free"] + stats["host_blocks_cached"] == stats["host_blocks_total"] > 0


def test_a_conversation_whose_blocks_the_device_still_caches_takes_them_back_and_equals_hf(family):
    """a (4 registered blocks) is parked when b's decode needs room; b's growth then reclaims
    a's chain tail (2 blocks, least recently used first) and leaves its first 2 cached: a's
    next turn takes those back (no copy), restores the other 2, and gives the tokens of a
    full recompute."""
    name, path, hf = family
    if name == "mistral_window":
        pytest.skip("a window model's kept blocks are not its original blocks from the first on: "
                    "its swap-ins copy everything (tests above)")
    engine = make_engine(path, block_size=BS, num_blocks=10, **HOST)
    a1 = prompt(9, seed=1)
    # 17 tokens, 16 with their KV written (the last sampled one has none yet): 4 full blocks
    ca = run_turn(engine, "a", a1, 8, start=True, end=False)
    b1 = prompt(24, seed=2)
    cb = run_turn(engine, "b", b1, 8, start=True, end=True)  # 32 tokens: 8 blocks, a parked for them
    assert engine.stats()["swap_outs"] == 1 and engine.kv.swapped(engine._live["a"].seq_id)
    a2 = prompt(6, seed=3)[1:]
    ca2 = run_turn(engine, "a", a2, 8, start=False, end=True)
    history = a1 + ca.token_ids + a2
    assert_hf_greedy(hf, a1, ca.token_ids)
    assert_hf_greedy(hf, b1, cb.token_ids)
    assert_hf_greedy(hf, history, ca2.token_ids)
    assert ca2.final.cached_tokens == len(a1) + len(ca.token_ids) - 1  # nothing recomputed
    stats = engine.stats()
    assert (stats["swap_ins"], stats["swap_in_device_hit_blocks"], stats["swap_in_blocks"]) == (1, 2, 2)
    assert stats["swap_in_blocks"] + stats["swap_in_device_hit_blocks"] == stats["swap_out_blocks"] == 4
    assert (stats["used"], stats["host_blocks_used"], stats["preemptions"]) == (0, 0, 0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_tiers"))
    return path, build_checkpoint(path, "LlamaForCausalLM", seed=4)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_kv_swaps_losslessly(llama, kv_dtype):
    """Swapping copies the codes and their scales bit for bit: the tokens equal the same
    quantised engine that never swaps (whose error against HF tests/engine/test_quantized_kv.py
    bounds)."""
    path, _ = llama
    swapping = make_engine(path, block_size=BS, num_blocks=12, kv_cache_dtype=kv_dtype, **HOST)
    roomy = make_engine(path, block_size=BS, num_blocks=128, kv_cache_dtype=kv_dtype, kv_host_memory_gb=0)
    _, got = round_robin(swapping, ["a", "b", "c"], turns=2, new_tokens=13, max_tokens=8)
    _, want = round_robin(roomy, ["a", "b", "c"], turns=2, new_tokens=13, max_tokens=8)
    assert [d[3].token_ids for d in got] == [d[3].token_ids for d in want]
    assert swapping.stats()["swap_ins"] == sum(d[4] for d in got) == 3 and roomy.stats()["host_blocks_total"] == 0
    assert swapping.stats()["host_blocks_used"] == swapping.stats()["used"] == 0


def fill_and_park(engine, hf):
    """Conversation "a" runs a turn, then "b" needs the whole pool: a goes to the host."""
    a = run_turn(engine, "a", prompt(14, 1), 6, start=True, end=False)
    run_turn(engine, "b", prompt(30, 2), 20, start=True, end=True)
    assert engine.stats()["host_sequences"] == 1 and engine.kv.swapped(engine._live["a"].seq_id)
    return prompt(14, 1) + a.token_ids


def test_two_turns_queued_on_a_parked_conversation_run_in_order(llama):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=14, **HOST)
    history = fill_and_park(engine, hf)
    c2, c3 = Collector(), Collector()
    t2, t3 = prompt(5, 7)[1:], prompt(4, 8)[1:]
    engine.submit("a", t2, greedy(6), c2, start=False, end=False)
    engine.submit("a", t3, greedy(5), c3, start=False, end=True)  # queued behind turn 2
    engine.run_until_idle()
    assert_hf_greedy(hf, history + t2, c2.token_ids)
    assert_hf_greedy(hf, history + t2 + c2.token_ids + t3, c3.token_ids)
    assert c2.final.cached_tokens == len(history) - 1  # restored, not recomputed
    stats = engine.stats()
    assert (stats["swap_ins"], stats["preemptions"], stats["used"], stats["host_blocks_used"]) == (1, 0, 0, 0)


def test_cancel_right_after_swap_in_and_end_while_parked_leak_nothing(llama):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=14, **HOST)
    fill_and_park(engine, hf)
    c = Collector()
    engine.submit("a", [9, 9], greedy(30), c, start=False, end=False, request_id="r")
    engine._drain()
    engine.step()  # swaps a in and prefills its two new tokens
    assert engine.stats()["swap_ins"] == 1 and engine.stats()["host_blocks_used"] == 0
    engine.abort("r")
    engine.run_until_idle()
    assert c.final.finish_reason == "cancelled"
    stats = engine.stats()
    assert (stats["used"], stats["host_blocks_used"], stats["live_sequences"]) == (0, 0, 0)
    # END while on the host: the host blocks are freed, nothing is copied back
    history = fill_and_park(engine, hf)
    parked = engine.stats()["host_blocks_used"]
    assert parked == -(-(len(history) - 1) // BS)
    end = run_turn(engine, "a", [], 1, start=False, end=True, close_only=True)
    assert end.final.finish_reason == "closed"
    stats = engine.stats()
    assert (stats["used"], stats["host_blocks_used"], stats["swap_ins"]) == (0, 0, 1)
    # cancelled while parked, before any step: freed from the host, never swapped in
    fill_and_park(engine, hf)
    engine.submit("a", [9], greedy(3), Collector(), start=False, end=False, request_id="r2")
    engine.abort("r2")
    engine.run_until_idle()
    stats = engine.stats()
    assert (stats["used"], stats["host_blocks_used"], stats["swap_ins"]) == (0, 0, 1)


def test_a_restore_in_flight_lets_the_other_rows_decode_and_its_turn_equals_hf(llama):
    """A conversation swapped in while another decodes: its copies are left in flight (the
    swapper reports them landed only at the fourth look) and the other conversation keeps
    decoding meanwhile; then the restored turn prefills only its new tokens. Both equal HF."""
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=16, **HOST)
    history = fill_and_park(engine, hf)
    a_id = engine._live["a"].seq_id
    looks, real = [], engine.swapper.restores_landed
    engine.swapper.restores_landed = lambda: looks.append(1) or (len(looks) > 3 and real())
    other, turn = Collector(), Collector()
    engine.submit("c", prompt(6, 9), greedy(16), other, start=True, end=True)
    engine._drain()
    engine.step()  # c's prefill: c is running when a's turn arrives
    new = prompt(4, 8)[1:]
    engine.submit("a", new, greedy(6), turn, start=False, end=True)
    engine._drain()
    steps_before = len(other.token_ids)
    engine.step()  # a swaps in (copies queued), c decodes without it
    assert engine.kv.restoring(a_id) and turn.token_ids == []
    for _ in range(3):  # not landed: c keeps decoding, a waits
        engine.step()
    assert len(looks) == 3 and turn.token_ids == [] and len(other.token_ids) >= steps_before + 3
    engine.run_until_idle()
    assert_hf_greedy(hf, history + new, turn.token_ids)
    assert_hf_greedy(hf, prompt(6, 9), other.token_ids)
    assert turn.final.cached_tokens == len(history) - 1  # restored, not recomputed
    stats = engine.stats()
    assert (stats["swap_ins"], stats["preemptions"], stats["used"], stats["host_blocks_used"]) == (1, 0, 0, 0)


def test_idle_timeout_frees_the_host_tier(llama):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=14, **HOST)
    fill_and_park(engine, hf)
    engine._live["a"].last_active -= engine.config.sequence_idle_timeout_s + 1
    engine._expire_idle()
    stats = engine.stats()
    assert (stats["host_blocks_used"], stats["host_sequences"], stats["live_sequences"]) == (0, 0, 0)


POLICIES = {
    "streaming": dict(kv_eviction="streaming", attention_sinks=4, kv_window=16),
    "h2o": dict(kv_eviction="h2o", attention_sinks=2, kv_window=12, heavy_hitter_tokens=8),
}


@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_streaming_and_h2o_kept_blocks_swap_like_any_others(tmp_path_factory, mode):
    path = str(tmp_path_factory.mktemp("llama_p128_tiers"))
    hf = build_checkpoint(path, seed=5, max_position_embeddings=128)
    p = POLICIES[mode]
    # a pool that holds one conversation's bounded blocks and a little more: the other is parked
    per = make_engine(path, block_size=BS, num_blocks=64, **p).policy.blocks_per_sequence(16)
    engine = make_engine(path, block_size=BS, num_blocks=per + 2, max_num_batched_tokens=16, **p, **HOST)
    refs = {n: DensePolicyReference(hf, mode, BS, p["kv_window"], p["attention_sinks"],
                                    p.get("heavy_hitter_tokens", 0)) for n in "ab"}
    pending = {n: [] for n in "ab"}
    for t in range(2):
        for i, n in enumerate("ab"):
            new = prompt(7, 10 * t + i)[(1 if t else 0):]
            c = run_turn(engine, n, new, 20, start=t == 0, end=t == 1)
            assert c.token_ids == reference_turn(refs[n], new, 20, pending[n], follow=c.token_ids), (n, t)
            if t:
                assert c.final.cached_tokens > 0  # restored from the host, not recomputed
    stats = engine.stats()
    assert stats["swap_ins"] == 2 and stats["preemptions"] == 0
    assert (stats["used"], stats["host_blocks_used"]) == (0, 0)


def test_a_prefix_reclaimed_from_the_device_is_loaded_from_the_host_and_equals_hf(llama):
    path, hf = llama
    engine = make_engine(path, block_size=BS, num_blocks=12, **HOST)
    shared = prompt(21, 11)  # 5 full blocks + 1 token
    first = run_turn(engine, "a", shared, 4, start=True, end=True)
    assert_hf_greedy(hf, shared, first.token_ids)
    # a registered 6 full blocks (24 computed tokens); fill's 11 blocks take the 6 free ones and
    # reclaim 5 of a's, chain tail first: a's first block alone stays cached on the device
    run_turn(engine, "fill", prompt(40, 12), 4, start=True, end=True)
    stats = engine.stats()
    assert (stats["demoted_blocks"], stats["host_blocks_cached"]) == (5, 5)
    again = shared[:20] + [7, 8, 9]
    c = run_turn(engine, "c", again, 6, start=True, end=True)
    assert_hf_greedy(hf, again, c.token_ids)
    assert c.final.cached_tokens == 20  # 1 block hit on the device, 4 loaded from the host
    stats = engine.stats()
    assert (stats["prefix_hit_blocks"], stats["host_prefix_hit_blocks"]) == (1, 4)
    assert (stats["used"], stats["host_blocks_used"]) == (0, 0)


def test_a_full_host_tier_drops_the_oldest_parked_conversation_which_recomputes(llama):
    path, hf = llama
    block = kv_block_bytes(ModelConfig.from_checkpoint(path), BS, torch.float32)
    # 4 conversations of 4 blocks after their first turn, 9 on their second; a pool of 10
    # blocks and a host tier of 10: the host must drop a parked conversation
    engine = make_engine(path, block_size=BS, num_blocks=10, kv_host_memory_gb=10.5 * block / 2**30,
                         enable_prefix_caching=False)
    assert engine.stats()["host_blocks_total"] == 10
    _, done = round_robin(engine, ["a", "b", "c", "d"], turns=2, new_tokens=9, max_tokens=8)
    for conv, t, context, c, parked in done:
        assert_hf_greedy(hf, context, c.token_ids)
    stats = engine.stats()
    dropped = engine.host_tier.counts()["dropped"]
    assert dropped >= 1 and stats["host_dropped_blocks"] > 0
    # a later turn found its blocks on the device or the host and restored everything, or its
    # conversation was dropped from the host (or preempted) and recomputed all (no prefix
    # caching here)
    recomputed = [c for *_, c, _ in done[4:] if c.final.cached_tokens == 0]
    assert len(recomputed) == dropped + stats["preemptions"]
    for conv, t, context, c, parked in done[4:]:
        assert c.final.cached_tokens in (0, len(context) - 9), conv
    assert sum(p for *_, p in done) == stats["swap_ins"] >= 1
    assert (stats["used"], stats["host_blocks_used"]) == (0, 0)



def test_conversations_the_host_tier_drops_spill_to_disk_and_come_back_equal_hf(llama, tmp_path):
    path, hf = llama
    block = kv_block_bytes(ModelConfig.from_checkpoint(path), BS, torch.float32)
    stale = tmp_path / "tritonkv-kv-999999999-0.bin"  # a killed server's file (no such pid)
    stale.write_bytes(b"x")
    # 4 conversations of 4 blocks after their first turn, 9 on their second; a pool of 10
    # blocks and a host tier of 10: the host drops a parked conversation, which spills to disk
    engine = make_engine(path, block_size=BS, num_blocks=10, kv_host_memory_gb=10.5 * block / 2**30,
                         kv_disk_path=str(tmp_path), kv_disk_gb=64.5 * block / 2**30, enable_prefix_caching=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith(f"tritonkv-kv-{os.getpid()}-")  # the stale one went
    assert engine.stats()["disk_blocks_total"] == 64
    _, done = round_robin(engine, ["a", "b", "c", "d"], turns=2, new_tokens=9, max_tokens=8)
    for conv, t, context, c, parked in done:
        assert_hf_greedy(hf, context, c.token_ids)
    stats = engine.stats()
    assert stats["host_dropped_blocks"] > 0 and stats["spill_blocks"] == stats["host_dropped_blocks"]
    assert stats["disk_swap_in_blocks"] == stats["spill_blocks"]  # each spilled conversation came back
    # nothing recomputed: every later turn restored its whole history (device, host or disk),
    # unless preempted as a running turn
    restored = [c.final.cached_tokens == len(context) - 9 for _, _, context, c, _ in done[4:]]
    assert restored.count(False) == stats["preemptions"]
    assert (stats["used"], stats["host_blocks_used"], stats["disk_blocks_used"]) == (0, 0, 0)
    engine.close()
    assert list(tmp_path.iterdir()) == []  # the run's file is removed at close
