"""The short locust run CI does (``python loadtest/run.py --ci``, here against the session's
shared server): both users over all three scenarios for a few seconds, zero failures and a
pool back at baseline; and a 20-second soak with cancels and disconnects."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def against(server) -> list[str]:
    return ["--grpc-url", server.grpc_url, "--http-url", server.http_url, "--metrics-url", server.metrics_url]


def test_ci_load_run_has_no_failures_and_no_leaked_blocks(tmp_path, e2e_server):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "backend"), os.path.join(ROOT, "client"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "loadtest", "run.py"), "--ci", "--out", str(tmp_path),
                           *against(e2e_server)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["failures"] == 0 and report["locust_exit_code"] == 0
    assert report["pool_at_baseline"] is True
    rows = {r["name"]: r for r in report["rows"]}
    assert report["turns"] == sum(r["turns"] for r in rows.values()) > 0
    for row in rows.values():
        assert row["failures"] == 0 and row["ttft_p50_ms"] > 0 and row["e2e_p50_ms"] >= row["ttft_p50_ms"]
    # every turn of a gRPC chat after the first was served from the conversation's KV (checked per
    # turn by the locustfile; a miss would be a failure), so the mean reused context is > 0
    if "grpc multiturn" in rows:
        assert rows["grpc multiturn"]["mean_cached_tokens"] > 0
    header = (tmp_path / "locust_stats.csv").read_text().splitlines()[0]
    assert header.startswith("Type,Name,Request Count,Failure Count")
    assert (tmp_path / "locust.html").stat().st_size > 1000
    assert "| scenario | turns | failures |" in (tmp_path / "summary.md").read_text()


def test_soak_with_cancels_and_disconnects_stays_bounded(tmp_path, e2e_server):
    """``run.py --soak`` for 20 s (by hand: 30 minutes): chats, HTTP streams, cancels after the
    first token and dropped connections; every 4 s the pool, live sequences, server RSS and
    open files are sampled and must stay bounded, and the pool ends at baseline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "backend"), os.path.join(ROOT, "client"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "loadtest", "run.py"), "--soak", "-t", "20s",
                           "--check-every", "4", "--out", str(tmp_path), *against(e2e_server),
                           "--server-pgid", str(e2e_server.process.pid)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["soak_bounded"] is True and report["soak_problems"] == []
    assert report["pool_at_baseline"] is True and report["failures"] == 0
    samples = report["soak_samples"]
    assert len(samples) >= 6 and samples[-1]["blocks_used"] == 0 and samples[-1]["live_sequences"] == 0
    assert max(s["live_sequences"] for s in samples) <= 2 * 6
    rows = {r["name"] for r in report["rows"]}
    assert {"chaos single cancel", "chaos shared-prefix disconnect"} <= rows  # abandoned work happened
    assert all(s["rss_bytes"] > 0 and s["open_files"] > 0 for s in samples)
