"""aiperf against the OpenAI endpoint (a bounded run of loadtest/aiperf_run.py): chat and
completions, streamed, every request answered with the requested number of tokens, no error."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_aiperf_chat_and_completions_streamed_without_errors(tmp_path, e2e_server):
    """Against the shared server, offline: the tokenizer is the path `tritonkv serve` prints."""
    out = tmp_path / "aiperf.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "loadtest", "aiperf_run.py"), "--concurrency", "4", "--requests", "8",
         "--warmup", "1", "--isl", "32", "--osl", "12", "--timeout-s", "400", "--out", str(out),
         "--url", e2e_server.openai_url[:-len("/v1")], "--model", e2e_server.model_name,
         "--tokenizer", e2e_server.checkpoint],
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {out}" in proc.stdout
    text = out.read_text()
    header = re.search(r"^\| endpoint \|.*$", text, flags=re.M).group(0)
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in re.findall(r"^\| (?:chat|completions) \|.*$", text, flags=re.M):
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(names, cells))
    assert set(rows) == {"chat", "completions"}
    for row in rows.values():
        assert (row["requests"], row["errors"], row["out tok"]) == ("8", "0", "12"), row
        assert float(row["out tok/s"]) > 0 and float(row["TTFT p50 ms"]) > 0
    # the chat prompt is the synthetic text inside the demo template (role markers, BOS)
    assert float(rows["chat"]["prompt tok"]) > float(rows["completions"]["prompt tok"])
