"""Tables, plot, greedy cross-check and result files of bench/serving_benchmark.py.

Files (``--out``/``--name``): NAME.md (what ran, the table, the cross-check, the floor),
NAME.json (the same numbers), NAME.png (throughput per level, TTFT CDF), NAME.tokens.json
(every request's greedy tokens per system and level: what the cross-check compared, and what
``--merge`` needs to check systems of a later run).
"""

from __future__ import annotations

import json
import os

import numpy as np

SERVED = ("tritonkv", "tritonkv-2x2")
COLORS = {"tritonkv": "tab:blue", "tritonkv-2x2": "tab:cyan", "inprocess": "tab:purple",
          "inprocess-eager": "tab:gray", "hf-static": "tab:green"}


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(samples, wall: float) -> dict:
    ttft = [s.ttft_s * 1000 for s in samples]
    tpot = [s.tpot_s * 1000 for s in samples if s.tpot_s is not None]
    tokens = sum(len(s.tokens) for s in samples)
    responses = [s.responses for s in samples]
    # tokens per response > 1: the server merged tokens that waited (a frontend behind its core)
    per_response = tokens / sum(responses) if responses and None not in responses and sum(responses) else None
    return {"requests": len(samples), "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "tokens_per_response": per_response,
            **{f"ttft_p{q}_ms": percentile(ttft, q) for q in (50, 90, 99)},
            **{f"tpot_p{q}_ms": percentile(tpot, q) for q in (50, 90, 99)},
            "e2e_p50_ms": percentile([s.e2e_s * 1000 for s in samples], 50), "ttft_ms": ttft}


def _first_difference(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def cross_check(tokens: dict, exact_all: bool) -> dict:
    """Each served system (and the HF peer, for information) against the in-process engine,
    request by request per level. Verdict FAILED: a request differs at concurrency 1 (batch 1
    on both sides: the same kernels, the same tokens), or at any level when ``exact_all``
    (fp32). Without a level 1 in common (a merged run) nothing is asserted: "not asserted"."""
    ref_name = "inprocess" if "inprocess" in tokens else "inprocess-eager" if "inprocess-eager" in tokens else None
    if ref_name is None:
        return {}
    ref = tokens[ref_name]
    out = {}
    for system in [s for s in (*SERVED, "hf-static") if s in tokens]:
        levels = sorted((c for c in tokens[system] if c in ref), key=int)
        per_level = {}
        for c in levels:
            pairs = list(zip(tokens[system][c], ref[c]))
            diffs = [_first_difference(a, b) for a, b in pairs]
            differing = [d for d in diffs if d is not None]
            per_level[c] = {"requests": len(pairs), "equal": len(pairs) - len(differing),
                            "first_difference_at": sorted(differing)}
        verdict, must = "-", []
        if system in SERVED and levels:
            must = levels if exact_all else [c for c in levels if int(c) == 1]
            verdict = ("not asserted" if not must else "FAILED" if any(
                per_level[c]["equal"] < per_level[c]["requests"] for c in must) else "passed")
        out[system] = {"against": ref_name, "verdict": verdict, "asserted_levels": must, "levels": per_level}
    return out


def merge_earlier(path: str, meta: dict, results: dict, tokens: dict, replacing=()) -> tuple[dict, dict]:
    """This run's results over an earlier run's (``path``: its NAME.json, NAME.tokens.json
    beside it). Rules: a system of this run (in ``results`` or ``replacing``, the systems it
    runs) replaces the earlier one whole, so no system mixes levels of two runs; the earlier
    meta stays as ``merged_from``; a level's floor that this run did not measure is the earlier
    run's. Returns (results, tokens); ``meta`` is updated in place."""
    with open(path) as f:
        old = json.load(f)
    old_tokens = {}
    tokens_file = os.path.splitext(path)[0] + ".tokens.json"
    if os.path.isfile(tokens_file):  # the earlier systems' tokens, for the cross-check
        with open(tokens_file) as f:
            old_tokens = json.load(f)["tokens"]
    drop = set(results) | set(replacing)
    meta["merged_from"] = old["meta"]
    meta["concurrency"] = sorted(set(old["meta"]["concurrency"]) | set(meta["concurrency"]))
    if old["meta"].get("reference"):
        meta["reference"] = {**old["meta"]["reference"], **meta.get("reference", {})}
    return ({s: r for s, r in old["results"].items() if s not in drop} | results,
            {s: t for s, t in old_tokens.items() if s not in drop} | tokens)


def markdown(results: dict, levels: list[int]) -> str:
    lines = ["| system | concurrency | requests | output tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | "
             "e2e p50 ms | tokens / response |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for system, per_level in results.items():
        for c in sorted(set(levels) | {int(k) for k in per_level if k.isdigit()}):
            r = per_level.get(str(c))
            if r is None:
                continue
            f = lambda k, digits=1: "-" if r.get(k) is None else f"{r[k]:.{digits}f}"  # noqa: E731
            lines.append(f"| {system} | {c} | {r['requests']} | {r['output_tokens_per_s']:,.1f} "
                         f"| {f('ttft_p50_ms')} / {f('ttft_p90_ms')} / {f('ttft_p99_ms')} "
                         f"| {f('tpot_p50_ms')} / {f('tpot_p90_ms')} / {f('tpot_p99_ms')} | {f('e2e_p50_ms')} "
                         f"| {f('tokens_per_response', 2)} |")
    return "\n".join(lines)


def stage_lines(results: dict, levels: list[int]) -> list[str]:
    """Where each level's time to first token went (means; backend/tritonkv/server/
    first_token_stages.py defines the stages), beside the clients' own mean TTFT."""
    rows = []
    for system, per_level in results.items():
        for c in sorted(set(levels) | {int(k) for k in per_level if k.isdigit()}):
            r = per_level.get(str(c)) or {}
            st = r.get("first_token_stages_ms")
            if st:
                ttft = r.get("ttft_ms") or []
                stages = " | ".join(f"{st[k]:.1f}" for k in ("admit", "queue", "prefill", "deliver"))
                mean = sum(ttft) / len(ttft) if ttft else float("nan")
                rows.append(f"| {system} | {c} | {stages} | {sum(st.values()):.1f} | {mean:.1f} |")
    if not rows:
        return []
    return ["## Where the time to first token goes (means, ms)", "",
            "admit: the frontend took the request -> the engine accepted it; queue: -> first in a step; prefill: "
            "-> first token emitted; deliver: -> first response sent (in-process: the engine's emit). The client's "
            "TTFT adds Triton's queue and the network both ways.", "",
            "| system | concurrency | admit | queue | prefill | deliver | stages | client TTFT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def cross_check_lines(check: dict) -> list[str]:
    lines = ["| system | against | level | equal / requests | first differing position of the others | asserted |",
             "|---|---|---:|---:|---|---|"]
    for system, r in check.items():
        for c, v in r["levels"].items():
            pos = ", ".join(map(str, v["first_difference_at"][:12])) + (" ..." if len(v["first_difference_at"]) > 12 else "")
            asserted = ("yes: " + r["verdict"]) if int(c) in map(int, r["asserted_levels"]) else "counted"
            lines.append(f"| {system} | {r['against']} | {c} | {v['equal']} / {v['requests']} | {pos or '-'} | {asserted} |")
    return lines


def plot(results: dict, levels: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cdf_levels = [c for c in levels if c >= 16][-2:] or levels[-1:]
    for system, per_level in results.items():
        cs = sorted(int(c) for c in per_level if c.isdigit())
        ax1.plot(cs, [per_level[str(c)]["output_tokens_per_s"] for c in cs], "o-", label=system,
                 color=COLORS.get(system))
        for c, style in zip(cdf_levels, ("-", "--")):
            if str(c) in per_level and system != "hf-static":
                ttft = sorted(per_level[str(c)]["ttft_ms"])
                ax2.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], style, where="post",
                         color=COLORS.get(system), label=f"{system}, c={c}")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
            title="Throughput vs concurrency")
    ax1.set_xticks(levels, [str(c) for c in levels])
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.set(xscale="log", xlabel="time to first token (ms)", ylabel="fraction of requests", title="TTFT CDF")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(args, meta: dict, results: dict, tokens: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    levels = meta["concurrency"]
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(stem + ".tokens.json", "w") as f:
        json.dump({"meta": {"command": meta["command"]}, "results": results, "tokens": tokens}, f)
    if not args.no_plot and results:
        plot(results, levels, stem + ".png")
    ran = meta["systems"]
    lines = [f"# Serving benchmark, {meta['device']}", "",
             f"Command: `{meta['command']}`" + (f" (merged into `{meta['merged_from']['command']}`)"
                                                 if meta.get("merged_from") else ""), "",
             f"Checkpoint: {meta['checkpoint']}; {meta['prompt_tokens']} prompt tokens (random ids, one prompt "
             f"per request, no prefix shared), exactly {meta['max_tokens']} output tokens, greedy; "
             f"{meta['client_processes']} client processes for the served systems; engine settings "
             f"{meta['engine_params'] or 'the repository defaults'}; torch {meta['torch']}, {meta['cpu_count']} cores.", "",
             "Systems that ran:", ""] + [f"- `{s}`: {d}" for s, d in ran.items()]
    if meta.get("merged_from"):
        lines += [f"- (earlier run) {s}: {d}" for s, d in meta["merged_from"].get("systems", {}).items()]
        lines += [f"- (earlier run) failed, replaced by this run's: {' '.join(f.split())}"
                  for f in meta["merged_from"].get("failed", []) if f.split(":")[0] in ran]
    if meta.get("merge_command"):
        lines += [f"- merged afterwards by `{meta['merge_command']}`"]
    for s, cmd in meta.get("server_commands", {}).items():
        lines.append(f"- server of `{s}`: `{cmd}`")
    if meta.get("failed"):
        lines += ["", "**Failed systems**: " + "; ".join(meta["failed"])]
    lines += ["", markdown(results, levels), ""]
    lines += stage_lines(results, levels)
    if meta.get("cross_check"):
        lines += ["## Greedy cross-check against the in-process engine", "",
                  "Asserted at concurrency 1 (batch 1 on both sides: the same kernels, the same tokens) and, "
                  "in fp32, at every level; at higher bf16 levels requests are batched differently in each run, "
                  "so a near-tie may flip one token and the rest of that request follows it: counted, with the "
                  "position of the first difference.", ""]
        lines += cross_check_lines(meta["cross_check"]) + [""]
    ref = meta.get("reference")
    if ref:
        lines += ["## Floor (same run)", "",
                  f"Copy bandwidth {ref['copy_bandwidth_GBps']:,.0f} GB/s (read + write); weights streamed per step "
                  f"{ref['weight_stream_GB']:.2f} GB; floor = (weights + KV read per step) / bandwidth:", "",
                  "| concurrency | floor step ms | floor tok/s |", "|---:|---:|---:|"]
        lines += [f"| {k[7:]} | {v['step_ms']:.2f} | {v['tok_per_s']:,.0f} |" for k, v in ref.items()
                  if k.startswith("floor_c")]
        lines += [f"- {k}: {v:,.1f}" for k, v in ref.items() if k.startswith("hf_generate")] + [""]
    peer = meta.get("hf_static_peer")
    if peer:
        lines += [f"HF static-cache peer: {peer.get('peer')}; transformers {peer.get('transformers')}, "
                  f"compile config {peer.get('compile_config')}; graphs compiled per batch: "
                  + ", ".join(f"B={b}: {r.get('compiled_graphs')}" for b, r in results.get('hf-static', {}).items())
                  + ("; compiled by hand (transformers did not)" if peer.get("compiled_by_hand") else ""), ""]
    if not args.no_plot and results:
        lines.append(f"![throughput and TTFT CDF]({args.name}.png)")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    """Merge two results files already written (a later call's systems over an earlier call's,
    as ``serving_benchmark.py --merge`` does while it runs) and rewrite the report."""
    import argparse
    import sys
    from types import SimpleNamespace

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--merge", nargs=2, metavar=("EARLIER", "LATER"), required=True, help="two NAME.json files")
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    earlier, later = args.merge
    with open(later) as f:
        run = json.load(f)
    with open(os.path.splitext(later)[0] + ".tokens.json") as f:
        later_tokens = json.load(f)["tokens"]
    meta = run["meta"]
    results, tokens = merge_earlier(earlier, meta, run["results"], later_tokens)
    meta["merge_command"] = " ".join(["python bench/serving_report.py", *(argv if argv is not None else sys.argv[1:])])
    meta["cross_check"] = cross_check(tokens, exact_all=meta["device"] == "cpu")
    write_results(SimpleNamespace(out=args.out, name=args.name, no_plot=args.no_plot), meta, results, tokens)
    print(markdown(results, meta["concurrency"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
