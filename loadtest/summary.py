"""The summary table of a locust run, read from locust's ``<prefix>_stats.csv``.

One row per "<proto> <scenario>": turns, failures, TTFT / TPOT / end-to-end percentiles (ms),
output tokens/s over the run (tokens of successful turns / run time) and mean context tokens
reused per turn.
"""

from __future__ import annotations

import csv
import json


def read_stats(csv_path: str) -> dict[tuple[str, str], dict[str, str]]:
    with open(csv_path, newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f) if row["Name"] != "Aggregated"}


def _f(row, key) -> float | None:
    if row is None or row.get(key) in (None, "", "N/A"):
        return None
    return float(row[key])


def summarize(stats: dict) -> list[dict]:
    rows = []
    for name in sorted({name for _type, name in stats}):
        e2e, ttft, tpot, rate, cached = (stats.get((t, name)) for t in ("e2e", "TTFT", "TPOT", "tok/s", "cached"))
        turns = int(_f(e2e, "Request Count") or 0)
        failures = int(_f(e2e, "Failure Count") or 0)
        ok = turns - failures
        rps = _f(e2e, "Requests/s") or 0.0  # locust: all turns / run time
        mean_tokens = (_f(e2e, "Average Content Size") or 0.0) * turns / ok if ok else 0.0
        rows.append({
            "name": name, "turns": turns, "failures": failures,
            "ttft_p50_ms": _f(ttft, "50%"), "ttft_p95_ms": _f(ttft, "95%"),
            "tpot_p50_ms": _f(tpot, "50%"), "tpot_p95_ms": _f(tpot, "95%"),
            "e2e_p50_ms": _f(e2e, "50%"), "e2e_p95_ms": _f(e2e, "95%"),
            "output_tokens_per_s": rps * (ok / turns if turns else 0) * mean_tokens,
            "per_turn_tokens_per_s_p50": _f(rate, "50%"),
            "mean_cached_tokens": _f(cached, "Average Response Time"),
        })
    return rows


def _cell(v, fmt="{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = ("| scenario | turns | failures | TTFT p50 / p95 ms | TPOT p50 / p95 ms | e2e p50 / p95 ms "
            "| output tok/s (run) | tok/s per turn p50 | reused ctx tokens (mean) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['turns']} | {r['failures']} "
            f"| {_cell(r['ttft_p50_ms'])} / {_cell(r['ttft_p95_ms'])} "
            f"| {_cell(r['tpot_p50_ms'], '{:.1f}')} / {_cell(r['tpot_p95_ms'], '{:.1f}')} "
            f"| {_cell(r['e2e_p50_ms'])} / {_cell(r['e2e_p95_ms'])} "
            f"| {_cell(r['output_tokens_per_s'], '{:.1f}')} | {_cell(r['per_turn_tokens_per_s_p50'], '{:.1f}')} "
            f"| {_cell(r['mean_cached_tokens'], '{:.1f}')} |")
    return "\n".join(lines)


def write_summary(rows: list[dict], extra: dict, md_path: str, json_path: str) -> str:
    table = markdown_table(rows)
    notes = "\n".join(f"- {k}: {v}" for k, v in extra.items())
    with open(md_path, "w") as f:
        f.write("# tritonkv locust run\n\n" + table + "\n\n" + notes + "\n")
    with open(json_path, "w") as f:
        json.dump({"rows": rows, **extra}, f, indent=2)
    return table
