"""bench/results/gpu_check.md from a whole-suite run (bench/gpu_run.sh check): pytest's JUnit
XML (the parallel run, and the serial re-run of what failed in it), the smoke benchmarks'
table, and what the machine is.

    python bench/gpu_report.py --junit OUT/junit.xml [--rerun OUT/junit_rerun.xml]
        [--record OUT/record.tsv] [--smoke OUT/smoke.tsv] [--commit SHA] [--command CMD] [--wall-s S] --out OUT/gpu_check.md
    python bench/gpu_report.py --failed OUT/junit.xml     # node ids of failures, one a line

Rules: a test counts as failed if it failed (or errored) in the parallel run and again when
re-run alone; one that passed alone is listed as such (an interaction between parallel
workers, not hidden). A skip whose reason names CUDA, the GPU or TRITONKV_TEST_DEVICE is a
CUDA skip (the target is none). Exit status 1 when anything failed or was skipped for CUDA.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SKIP = re.compile(r"cuda|gpu|TRITONKV_TEST_DEVICE", re.I)


def node_id(case: ET.Element) -> str:
    """pytest node id from a JUnit testcase (classname 'tests.engine.test_runner[.Class]')."""
    parts = case.get("classname", "").split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if os.path.isfile(os.path.join(ROOT, path)):
            return "::".join([path, *parts[i:], case.get("name", "")])
    return "::".join([*parts, case.get("name", "")])


def read_junit(path: str) -> list[dict]:
    """One dict per test: id, outcome (passed / failed / error / skipped), seconds, message."""
    if not path or not os.path.isfile(path):
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or (el.text or "")).strip()
                break
        rows.append({"id": node_id(case), "outcome": outcome, "s": float(case.get("time") or 0),
                     "message": message})
    return rows


def read_record(path: str) -> list[dict]:
    """tests/conftest.py's $TRITONKV_TEST_RECORD lines (a run cut short has no JUnit file)."""
    if not path or not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            node, outcome, secs, reason = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
            rows.append({"id": node, "outcome": outcome, "s": float(secs or 0), "message": reason})
    return rows


def first_line(text: str, width: int = 220) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return (line[:width] + "...") if len(line) > width else line


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as e:  # noqa: BLE001
        info["torch"] = f"not importable ({e})"
    from importlib.metadata import version

    for mod in ("triton", "transformers", "onnx", "onnxruntime", "xgrammar"):
        try:
            __import__(mod)  # importable here, and the installed distribution's version
            info[mod] = version(mod)
        except Exception as e:  # noqa: BLE001
            info[mod] = f"not importable ({type(e).__name__}: {str(e)[:160]})"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or "-"
    except Exception:  # noqa: BLE001
        info["driver"] = "-"
    info["tritonserver"] = os.environ.get("TRITONSERVER", "pytriton's (not set)")
    return info


def report(args) -> tuple[str, bool]:
    first = read_junit(args.junit)
    cut_short = not first and bool(read_record(args.record))
    if cut_short:
        first = read_record(args.record)
    rerun = {r["id"]: r for r in read_junit(args.rerun)}
    failed, flaky = [], []
    for r in first:
        if r["outcome"] in ("failed", "error"):
            again = rerun.get(r["id"])
            (flaky if again is not None and again["outcome"] == "passed" else failed).append((r, again))
    skipped = [r for r in first if r["outcome"] == "skipped"]
    cuda_skips = [r for r in skipped if CUDA_SKIP.search(r["message"])]
    passed = sum(r["outcome"] == "passed" for r in first) + len(flaky)
    m = machine()
    what = "Part of the test suite (PYTEST_ARGS)" if "PYTEST_ARGS=" in args.command else "The whole test suite"
    lines = [f"# {what} on {m.get('device')} ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Commit `{args.commit}`; command `{args.command}` (bench/gpu_run.sh; "
             "`TRITONKV_TEST_DEVICE=cuda`: the engine tests run on CUDA, kernels through Triton, "
             "tritonserver with KIND_GPU instances).", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", "| tests | passed | failed | skipped | of them CUDA skips | passed only when re-run alone | suite wall s |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {len(first)} | {passed} | {len(failed)} | {len(skipped)} | {len(cuda_skips)} | {len(flaky)} "
              f"| {args.wall_s or '-'} |", ""]
    if cut_short:
        lines += ["**The suite did not finish** (its time limit, or a crash): the counts are of the tests "
                  "that ended before (tests/conftest.py's record); the rest did not run. pytest.log has the end.", ""]
    elif not first:
        lines += ["**No result**: pytest did not finish (its time limit, or a crash) and recorded no test; "
                  "the log's end is in pytest.log.", ""]
    if failed:
        lines += ["## Failed", ""] + [f"- `{r['id']}`: {first_line((again or r)['message'])}" for r, again in failed] + [""]
    if flaky:
        lines += ["## Failed in the parallel run, passed alone", ""]
        lines += [f"- `{r['id']}`: {first_line(r['message'])}" for r, _ in flaky] + [""]
    if skipped:
        lines += ["## Skipped (each with its reason)", ""]
        lines += [f"- `{r['id']}`: {first_line(r['message'])}{' **(CUDA skip)**' if r in cuda_skips else ''}"
                  for r in skipped] + [""]
    slow = sorted(first, key=lambda r: -r["s"])[:args.durations]
    if slow:
        lines += [f"## Slowest {len(slow)} tests (seconds, parallel run)", "", "| test | s |", "|---|---:|"]
        lines += [f"| `{r['id']}` | {r['s']:.1f} |" for r in slow] + [""]
    if args.smoke and os.path.isfile(args.smoke):
        lines += ["## Smoke runs of the GPU benchmarks (outputs not kept)", "",
                  "| benchmark | command | exit | s | last line |", "|---|---|---:|---:|---|"]
        with open(args.smoke) as f:
            for row in f:
                name, cmd, rc, secs, last = (row.rstrip("\n").split("\t") + [""] * 5)[:5]
                lines.append(f"| {name} | `{cmd}` | {rc} | {secs} | {last.replace('|', '/')[:160]} |")
        lines.append("")
    ok = not failed and not cuda_skips and bool(first) and not cut_short
    lines.append(f"Verdict: {'no failure, no CUDA skip' if ok else 'NOT clean (see above)'}.")
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit")
    p.add_argument("--rerun")
    p.add_argument("--record", help="tests/conftest.py's $TRITONKV_TEST_RECORD file (used when JUnit is missing)")
    p.add_argument("--smoke")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--command", default="bash bench/gpu_run.sh check")
    p.add_argument("--wall-s", default="")
    p.add_argument("--durations", type=int, default=25)
    p.add_argument("--out")
    p.add_argument("--failed", metavar="JUNIT", help="print the node ids of failures and errors, one a line")
    args = p.parse_args(argv)
    if args.failed:
        for r in read_junit(args.failed):  # nothing at all when nothing failed: no empty node id
            if r["outcome"] in ("failed", "error"):
                print(r["id"])
        return 0
    text, ok = report(args)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
