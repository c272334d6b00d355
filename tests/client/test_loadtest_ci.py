"""The short locust run CI does: ``python loadtest/run.py --ci`` starts its own server, runs
both users over all three scenarios for a few seconds, and must see zero failures and a pool
back at baseline."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ci_load_run_has_no_failures_and_no_leaked_blocks(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "backend"), os.path.join(ROOT, "client"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "loadtest", "run.py"), "--ci", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
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
