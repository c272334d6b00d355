"""The model runner: persistent step buffers, graph batch sizes, and (on CUDA) decode graphs
that give the same greedy tokens as eager steps."""

import pytest
import torch

from engine_helpers import TEST_DEVICE, Collector, greedy, make_engine
from tiny_models import build_tiny_checkpoint
from tritonkv.engine import runner as runner_module
from tritonkv.engine.runner import StepRow, context_buckets, graph_batch_sizes


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_checkpoint("llama", path)
    return path


def test_graph_batch_sizes():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(128)[-3:] == [96, 112, 128]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]


def test_context_buckets():
    assert context_buckets(8192) == [512, 2048, 8192]
    assert context_buckets(1024) == [512, 1024]
    assert context_buckets(512) == [512]
    assert context_buckets(100) == [100]


def test_fill_writes_exact_step_inputs(llama):
    engine = make_engine(llama, device="cpu", block_size=4)
    runner = engine.runner
    rows = [StepRow([7, 8, 9, 10, 11], 2, [5, 3], False),  # a prefill chunk at positions 2..6
            StepRow([42], 9, [1, 6, 2], True)]  # a decode token at position 9
    tokens, max_q, max_len, sample_at, num_prev = runner._fill(rows, 4)  # two padding rows
    assert (tokens, max_q, max_len, sample_at, num_prev) == (8, 5, 10, [5], 0)
    v = runner.inputs.views()
    assert v["ids"].tolist() == [7, 8, 9, 10, 11, 42, 0, 0]
    assert v["positions"].tolist() == [2, 3, 4, 5, 6, 9, 0, 0]
    # slot = block_table[pos // 4] * 4 + pos % 4; padding writes nowhere (-1)
    assert v["slots"].tolist() == [22, 23, 12, 13, 14, 9, -1, -1]
    assert v["seq_lens"].tolist() == [7, 10, 1, 1]
    assert v["query_start_loc"].tolist() == [0, 5, 6, 7, 8]
    # each row's table, then block 0 (never stale entries: the CPU attention gathers them)
    assert v["block_tables"][:, :4].tolist() == [[5, 3, 0, 0], [1, 6, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert v["sample_rows"].tolist() == [5]
    assert v["prev_src"].tolist() == [-1] * 8


def _two_turns(engine, lengths, prompt, second_prompt, second_len):
    """Conversation ``c<i>``: a first turn of ``lengths[i]`` tokens on ``prompt(i)``, run to
    idle, then a closing turn of ``second_len`` tokens on ``second_prompt(i)``. Returns the
    two turns' collectors of every conversation."""
    first = []
    for i, n in enumerate(lengths):
        c = Collector()
        engine.submit(f"c{i}", prompt(i), greedy(n), c, start=True, end=False)
        first.append(c)
    engine.run_until_idle()
    second = []
    for i in range(len(lengths)):
        c = Collector()
        engine.submit(f"c{i}", second_prompt(i), greedy(second_len), c, start=False, end=True)
        second.append(c)
    engine.run_until_idle()
    return first, second


def _force_overlap(engine, monkeypatch):
    """Pretend decode graphs exist, so the engine overlaps; steps still run eagerly on the CPU."""
    engine.runner.graphs = {(1, 1): None}
    monkeypatch.setattr(engine.runner, "_graph_key", lambda n, max_len: None)


def _run_batch(engine, prompts, max_tokens):
    outs = [Collector() for _ in prompts]
    for i, (p, c) in enumerate(zip(prompts, outs)):
        engine.submit(f"s{i}", p, greedy(max_tokens), c, start=True, end=True)
    engine.run_until_idle()
    return [c.token_ids for c in outs]


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs need TRITONKV_TEST_DEVICE=cuda")
@pytest.mark.parametrize("batch", [1, 3, 5, 17])
def test_graph_decode_equals_eager(llama, batch):
    prompts = [[1] + [(7 * i + 3 * j) % 90 + 3 for j in range(5 + 4 * i)] for i in range(batch)]
    graphs = make_engine(llama, enable_cuda_graphs=True)
    eager = make_engine(llama, enable_cuda_graphs=False)
    assert graphs.runner.graphs and not eager.runner.graphs
    got = _run_batch(graphs, prompts, 12)
    assert graphs.step_times.kinds["decode_graph"].steps > 0
    assert got == _run_batch(eager, prompts, 12)


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs need TRITONKV_TEST_DEVICE=cuda")
def test_graph_decode_with_preemption_equals_eager(llama):
    prompts = [[1] + [(5 * i + j) % 90 + 3 for j in range(14)] for i in range(6)]
    small = dict(num_blocks=24, block_size=4)  # 6 sequences of 15 + 16 tokens cannot all fit
    graphs = make_engine(llama, enable_cuda_graphs=True, **small)
    got = _run_batch(graphs, prompts, 16)
    assert graphs.scheduler.num_preemptions > 0
    assert got == _run_batch(make_engine(llama, enable_cuda_graphs=False, num_blocks=256), prompts, 16)
    assert graphs.pool.counts()["used"] == 0


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs need TRITONKV_TEST_DEVICE=cuda")
def test_overlapped_decode_with_uneven_lengths_and_a_second_turn_equals_eager(llama):
    """Sequences that end at different steps (the step in flight past a finished turn is
    dropped) and a second turn on a conversation whose first turn ran overlapped."""
    def run(engine):
        first, second = _two_turns(engine, (3, 7, 12, 1),
                                   lambda i: [1] + [(11 * i + j) % 90 + 3 for j in range(6 + i)],
                                   lambda i: [5, 6, 7 + i], 9)
        return [c.token_ids for c in first + second], [c.final.cached_tokens for c in second]

    graphs = make_engine(llama, enable_cuda_graphs=True)
    got = run(graphs)
    assert got == run(make_engine(llama, enable_cuda_graphs=False))
    assert [len(t) for t in got[0]] == [3, 7, 12, 1, 9, 9, 9, 9]
    assert graphs.pool.counts()["used"] == 0


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs need TRITONKV_TEST_DEVICE=cuda")
def test_decode_crossing_a_context_bucket_equals_eager(llama, monkeypatch):
    """Two sequences decode from 120 to 150 tokens: the graphs of the 128-token bucket, then
    of the next one (the tiny model's whole context is 512 tokens)."""
    monkeypatch.setattr(runner_module, "FIRST_CONTEXT_BUCKET", 128)
    prompts = [[1] + [(3 * i + j) % 90 + 3 for j in range(119)] for i in range(2)]
    graphs = make_engine(llama, enable_cuda_graphs=True)
    assert {bound for _, bound in graphs.runner.graphs} == {128, 512}
    got = _run_batch(graphs, prompts, 30)
    assert got == _run_batch(make_engine(llama, enable_cuda_graphs=False), prompts, 30)


def test_overlap_logic_on_cpu_equals_plain_steps(llama, monkeypatch):
    """The overlapped step loop (continuations launched from the previous step's ids on the
    device, rows of ended turns dropped) runs on the CPU too when forced: same tokens as plain
    steps, with uneven lengths, a second turn and a cancel."""
    def run(engine, overlap):
        if overlap:
            _force_overlap(engine, monkeypatch)
        first, second = _two_turns(engine, (3, 9, 14),
                                   lambda i: [1] + [(5 * i + j) % 90 + 3 for j in range(5 + i)],
                                   lambda i: [4, 8 + i], 6)
        return [c.token_ids for c in first + second]

    overlapped = make_engine(llama, device="cpu")
    continued = []
    real = overlapped._continue_pending
    monkeypatch.setattr(overlapped, "_continue_pending", lambda: continued.append(real()) or continued[-1])
    got = run(overlapped, True)
    assert got == run(make_engine(llama, device="cpu"), False)
    assert [len(t) for t in got] == [3, 9, 14, 6, 6, 6]
    assert sum(continued) > 10  # most decode steps were launched before the last one was read
    assert overlapped.pool.counts()["used"] == 0


def test_overlap_on_cpu_cancel_mid_stream(llama, monkeypatch):
    """A cancel seen while a step is in flight ends the turn at once; its row of the step in
    flight is dropped, the others go on, and no block is lost."""
    from tritonkv.engine import conversations

    monkeypatch.setattr(conversations, "CANCEL_POLL_S", 0.0)
    engine = make_engine(llama, device="cpu")
    _force_overlap(engine, monkeypatch)
    keep, cut = Collector(), Collector()
    prompt = [1, 9, 8, 7, 6]
    engine.submit("keep", prompt, greedy(20), keep, start=True, end=True)
    engine.submit("cut", prompt, greedy(20), cut, start=True, end=True,
                  is_cancelled=lambda: len(cut.token_ids) >= 5)
    engine.run_until_idle()
    assert keep.final.finish_reason == "length" and len(keep.token_ids) == 20
    assert cut.final.finish_reason == "cancelled"
    assert 5 <= len(cut.token_ids) <= 6 and cut.token_ids == keep.token_ids[:len(cut.token_ids)]
    assert engine.pool.counts()["used"] == 0 and engine.stats()["live_sequences"] == 0


def test_a_row_fed_from_the_previous_launch_reads_its_sampled_id(llama):
    """``from_prev``: the input token is the previous launch's sample, read on the device; the
    step equals one given that token from the host. A stale launch as ``prev`` is refused."""
    def two_steps(feed_from_prev):
        runner = make_engine(llama, device="cpu", block_size=4).runner
        first = runner.launch([StepRow([1, 5, 6], 0, [0], True, greedy(4))])
        token = runner.collect(first)[0]
        row = StepRow([0 if feed_from_prev else token], 3, [0], True, greedy(4),
                      from_prev=0 if feed_from_prev else -1)
        return token, runner.collect(runner.launch([row], first))[0]

    assert two_steps(True) == two_steps(False)
    runner = make_engine(llama, device="cpu", block_size=4).runner
    old = runner.launch([StepRow([1, 5, 6], 0, [0], True, greedy(4))])
    runner.launch([StepRow([2, 7], 0, [1], True, greedy(4))])
    with pytest.raises(ValueError, match="previous launch"):
        runner.launch([StepRow([0], 3, [0], True, greedy(4), from_prev=0)], old)
