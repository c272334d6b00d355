"""The Gateway API Inference Extension's model server protocol (its docs/proposals/003: the
metrics its endpoint picker and llm-d scrape), checked against a real engine: each metric the
protocol names exists, is a gauge, and means what the protocol says, with values computed
here from the workload."""

from types import SimpleNamespace

import pytest

from engine_helpers import greedy, make_engine
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.server.gauges import CACHE_CONFIG_INFO, PROTOCOL_GAUGES, Gauges

# the protocol's table: metric -> (type, meaning), as its document states them
PROTOCOL = {
    "TotalQueuedRequests": ("gauge", "requests in the queue"),
    "TotalRunningRequests": ("gauge", "requests actively being served"),
    "KVCacheUtilization": ("gauge", "KV cache utilization, 1.0 = full (vLLM's kv_cache_usage_perc)"),
}
LABELS = {"model": "llm_stateless", "instance": "llm_stateless_0_0"}


class Family:
    GAUGE = "gauge"

    def __init__(self, name, description, kind):
        self.name, self.kind, self.description, self.metrics = name, kind, description, {}
        FAMILIES[name] = self

    def Metric(self, labels):  # noqa: N802 - pb_utils' name
        metric = SimpleNamespace(value=None)
        metric.set = lambda v: setattr(metric, "value", v)
        self.metrics[tuple(sorted(labels.items()))] = metric
        return metric


FAMILIES: dict[str, Family] = {}


def value(name):
    (metric,) = FAMILIES[name].metrics.values()
    return metric.value


@pytest.fixture
def published():
    FAMILIES.clear()
    engine = make_engine(ensure_demo_checkpoint(), num_blocks=64, block_size=4, max_num_seqs=1)
    gauges = Gauges(SimpleNamespace(MetricFamily=Family), LABELS)
    by_protocol = {metric: name for name, (metric, _) in PROTOCOL_GAUGES.items()}

    def read():
        gauges.publish(engine)
        return {metric: value(name) for metric, name in by_protocol.items()}

    return engine, read


def test_every_protocol_metric_is_a_gauge_named_once(published):
    _, read = published
    read()
    names = {metric: name for name, (metric, _) in PROTOCOL_GAUGES.items()}
    assert set(names) == set(PROTOCOL)
    for metric, (kind, _) in PROTOCOL.items():
        assert FAMILIES[names[metric]].kind == kind
        assert metric in FAMILIES[names[metric]].description  # the protocol name is in its HELP
    info = FAMILIES[CACHE_CONFIG_INFO]
    (labels,) = info.metrics
    assert dict(labels)["block_size"] == "4" and dict(labels)["num_gpu_blocks"] == "64"  # BlockSize, NumGPUBlocks
    assert info.metrics[labels].value == 1.0


def test_queued_running_and_kv_usage_follow_the_workload(published):
    """max_num_seqs 1: two 20-token requests sent; before the engine takes them both are queued;
    after one step the first holds KV for its 20 prompt tokens (5 blocks of 4, of 64) and the
    second waits; when both are done nothing runs, waits or holds KV."""
    engine, read = published
    outs = []
    for i in range(2):
        engine.submit(i, [256] + list(range(60 + i, 79 + i)), greedy(8), outs.append, start=True, end=True)
    assert read() == {"TotalQueuedRequests": 2, "TotalRunningRequests": 0, "KVCacheUtilization": 0.0}
    engine._drain()
    engine.step()
    assert read() == {"TotalQueuedRequests": 1, "TotalRunningRequests": 1, "KVCacheUtilization": 5 / 64}
    engine.run_until_idle()
    assert read() == {"TotalQueuedRequests": 0, "TotalRunningRequests": 0, "KVCacheUtilization": 0.0}
    assert len([t for o in outs for t in o.token_ids]) == 16
