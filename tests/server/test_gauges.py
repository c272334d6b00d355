"""The instance's gauges: Engine.stats() keys under their metric names, evicted blocks by
reason, and the pool's capacity (bytes per token, tokens, max_model_len sequences)."""

from types import SimpleNamespace

from tritonkv.config import EngineConfig
from tritonkv.engine.factory import build_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.server.gauges import Gauges

LABELS = {"model": "llm", "instance": "llm_0_0"}


class FakeMetricFamily:
    GAUGE = "gauge"
    families = {}

    def __init__(self, name, description, kind):
        assert kind == self.GAUGE and description and name not in self.families
        self.name, self.metrics = name, {}
        self.families[name] = self

    def Metric(self, labels):
        metric = SimpleNamespace(value=None)
        metric.set = lambda v: setattr(metric, "value", v)
        self.metrics[tuple(sorted(labels.items()))] = metric
        return metric


def scrape() -> dict:
    """name{label=value,...} -> value, as /metrics would show them."""
    return {name + "{" + ",".join(f"{k}={v}" for k, v in labels if k not in LABELS) + "}": m.value
            for name, f in FakeMetricFamily.families.items() for labels, m in f.metrics.items()}


def test_stats_capacity_and_evictions_by_reason():
    FakeMetricFamily.families = {}
    engine = build_engine(EngineConfig(checkpoint=ensure_demo_checkpoint(), device="cpu", kv_cache_dtype="int8",
                                       num_blocks=100, block_size=16, max_model_len=500))
    gauges = Gauges(SimpleNamespace(MetricFamily=FakeMetricFamily), LABELS)
    stats = {"total": 100, "used": 3, "cached": 7, "free": 90, "live_sequences": 1, "prefix_query_blocks": 9,
             "prefix_hit_blocks": 4, "reclaimed": 5, "preemptions": 2, "generated_tokens": 40}
    engine.stats = lambda: dict(stats)
    gauges.publish(engine)
    m = scrape()
    # demo model: 6 layers x 2 KV heads x (64 int8 codes + a 4-byte scale), K and V
    assert m["tritonkv_kv_bytes_per_token{}"] == 2 * 6 * 2 * (64 + 4) == 1632
    assert m["tritonkv_kv_capacity_tokens{}"] == 1600.0
    assert m["tritonkv_kv_max_len_sequences{}"] == 100 // 32  # 500 tokens = 32 blocks of 16
    assert m["tritonkv_kv_blocks_used{}"] == 3 and m["tritonkv_preemptions_total{}"] == 2
    assert m["tritonkv_kv_evictions_total{}"] == 5  # the name clients read stays
    # an engine without eviction policies reports only the prefix cache's LRU evictions
    assert {k: v for k, v in m.items() if k.startswith("tritonkv_kv_evicted")} == {
        "tritonkv_kv_evicted_blocks_total{reason=prefix_lru}": 5}
    stats.update(reclaimed=6, evicted_blocks_window=11, evicted_blocks_streaming=0, evicted_blocks_h2o=13,
                 preempted_blocks=8)
    gauges.publish(engine)
    assert {k: v for k, v in scrape().items() if k.startswith("tritonkv_kv_evicted")} == {
        "tritonkv_kv_evicted_blocks_total{reason=prefix_lru}": 6,
        "tritonkv_kv_evicted_blocks_total{reason=window}": 11,
        "tritonkv_kv_evicted_blocks_total{reason=streaming}": 0,
        "tritonkv_kv_evicted_blocks_total{reason=h2o}": 13,
        "tritonkv_kv_evicted_blocks_total{reason=preemption}": 8}


def test_gauges_of_a_real_engine_match_the_workload():
    """No stubbed stats: a real engine runs two conversations and the gauges must show what
    the workload implies, computed here from the token counts (block size 4, 64 blocks): the
    first holds prompt + output - 1 tokens of KV (the last token's KV is not computed yet),
    the second reuses the first one's 4 full prompt blocks it shares. Looked-up blocks are the
    full blocks before a prompt's last token (that token is always computed: (20 - 1) // 4)."""
    from engine_helpers import make_engine, run_turn

    FakeMetricFamily.families = {}
    engine = make_engine(ensure_demo_checkpoint(), num_blocks=64, block_size=4)
    gauges = Gauges(SimpleNamespace(MetricFamily=FakeMetricFamily), LABELS)
    first = [256] + list(range(60, 79))  # 20 tokens: 5 full blocks
    second = first[:16] + [90, 91, 92, 93]  # shares 4 full blocks with the first
    assert len(run_turn(engine, 1, first, 6, start=True, end=False).token_ids) == 6
    gauges.publish(engine)
    m = scrape()
    held = -(-(20 + 6 - 1) // 4)  # 25 tokens of KV: 7 blocks
    assert (m["tritonkv_kv_blocks_total{}"], m["tritonkv_kv_blocks_used{}"]) == (64, held)
    assert m["tritonkv_kv_blocks_free{}"] + m["tritonkv_kv_blocks_cached{}"] == 64 - held
    assert (m["tritonkv_live_sequences{}"], m["tritonkv_generated_tokens_total{}"]) == (1, 6)
    assert (m["tritonkv_prefix_query_blocks_total{}"], m["tritonkv_prefix_hit_blocks_total{}"]) == ((20 - 1) // 4, 0)
    assert len(run_turn(engine, 2, second, 3, start=True, end=False).token_ids) == 3
    gauges.publish(engine)
    m = scrape()
    own = -(-(20 + 3 - 1) // 4) - 4  # 22 tokens of KV, 4 blocks of them shared
    assert m["tritonkv_kv_blocks_used{}"] == held + own
    assert (m["tritonkv_live_sequences{}"], m["tritonkv_generated_tokens_total{}"]) == (2, 9)
    assert (m["tritonkv_prefix_query_blocks_total{}"], m["tritonkv_prefix_hit_blocks_total{}"]) == (2 * ((20 - 1) // 4), 4)
