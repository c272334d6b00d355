"""README's speed table from a serving results file (bench/serving_benchmark.py's JSON), so
every number in it comes from that file and the README links it.

    python bench/readme_speed.py bench/results/serving_h200.json          # print the block
    python bench/readme_speed.py bench/results/serving_h200.json --write  # replace it in README.md

The block sits between ``<!-- speed:begin -->`` and ``<!-- speed:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from md_table import table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
COLUMNS = (("tritonkv", "tritonkv served"), ("tritonkv-2x2", "2 models x 2 instances"),
           ("inprocess", "same engine in-process"), ("hf-static", "HF static cache + torch.compile"))


def block(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    meta, results = data["meta"], data["results"]
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    cols = [(k, name) for k, name in COLUMNS if k in results]
    levels = sorted({int(c) for r in results.values() for c in r if c.isdigit()})
    ref = meta.get("reference", {})

    def cell(system, c):
        r = results.get(system, {}).get(str(c))
        if r is None:
            return "-"
        tpot = r.get("tpot_p50_ms")
        return f"{r['output_tokens_per_s']:,.0f}" + (f" ({tpot:.1f} ms)" if tpot else "")

    columns = ["concurrency", *(f"{name} tok/s (TPOT p50)" for _, name in cols)]
    if ref:
        columns.append("floor (weights + KV / copy bandwidth)")
    rows = []
    for c in levels:
        row = [c, *(cell(k, c) for k, _ in cols)]
        if ref:
            floor = ref.get(f"floor_c{c}")
            row.append(f"{floor['tok_per_s']:,.0f}" if floor else "-")
        rows.append(row)
    lines = [BEGIN,
             f"{meta['checkpoint']}, {meta['device']}, {meta['prompt_tokens']} prompt / {meta['max_tokens']} output "
             f"tokens, greedy; served = `tritonkv serve` with gRPC streams from {meta['client_processes']} client "
             f"processes ([{rel}]({rel}), `{meta['command']}`"
             + (f", merged over the earlier call `{meta['merged_from']['command']}`" if meta.get("merged_from") else "")
             + "):", "", *table(columns, rows)]
    check = meta.get("cross_check", {})
    if check:
        verdicts = ", ".join(f"{s}: {v['verdict']}" + (f" at c={', '.join(map(str, v['asserted_levels']))}"
                                                        if v["asserted_levels"] else "")
                             for s, v in check.items() if v["verdict"] != "-")
        lines += ["", f"Greedy tokens served vs in-process: {verdicts}; every level's count of equal requests "
                      "is in the results file."]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    text = block(args.results)
    if not args.write:
        print(text)
        return 0
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        s = f.read()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    s = s[:s.index(BEGIN)] + text + s[s.index(END) + len(END):]
    with open(readme, "w") as f:
        f.write(s)
    print(f"README.md speed block rewritten from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
