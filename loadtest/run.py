"""One command: start a tritonkv server on loopback, run locust headless against it, check the
pool is back to baseline, and write locust's CSV + HTML report plus a summary table.

    python loadtest/run.py                       # 16 users, 60 s, all scenarios, gRPC + HTTP users
    python loadtest/run.py --ci                  # what CI runs: 4 users, 6 s, 8 tokens per reply
    python loadtest/run.py --soak                # 30 min: chats, HTTP streams, cancels and disconnects,
                                                 # pool / RSS / open files checked every minute
    python loadtest/run.py --soak -t 2m --check-every 20   # the soak CI runs
    python loadtest/run.py --grpc-url H:P --http-url H:P --metrics-url URL   # an existing server

Outputs in --out: locust_stats.csv (and _failures, _exceptions, _stats_history), locust.html,
summary.md, summary.json. Exit status: 0 only when locust saw zero failures and the pool
(``tritonkv_kv_blocks_used``, ``tritonkv_live_sequences``) is back to 0 on every instance.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, os.path.join(ROOT, "client"), os.path.join(ROOT, "backend")):
    if path not in sys.path:
        sys.path.insert(0, path)

import summary  # noqa: E402
from tritonkv_client.metrics import fetch_metrics, parse_prometheus, wait_for_baseline  # noqa: E402

CI_PRESET = dict(users=4, spawn_rate=4, run_time="6s", max_tokens=8)
FULL_PRESET = dict(users=16, spawn_rate=4, run_time="60s", max_tokens=32)
SOAK_PRESET = dict(users=6, spawn_rate=6, run_time="30m", max_tokens=16)
SOAK_USERS = ["GrpcChatUser", "HttpStreamUser", "ChaosUser"]
PREFIX_COUNTERS = ("tritonkv_prefix_query_blocks_total", "tritonkv_prefix_hit_blocks_total",
                   "tritonkv_kv_evictions_total", "tritonkv_preemptions_total", "tritonkv_generated_tokens_total")


def counter_totals(metrics_url: str) -> dict[str, float]:
    samples = parse_prometheus(fetch_metrics(metrics_url))
    return {name: sum(v for _labels, v in samples.get(name, [])) for name in PREFIX_COUNTERS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ci", action="store_true", help="short run: %s" % CI_PRESET)
    p.add_argument("--soak", action="store_true", help="long run with cancels and disconnects and bounded-resource "
                   "checks: %s, users %s" % (SOAK_PRESET, SOAK_USERS))
    p.add_argument("--check-every", type=float, default=60.0, help="soak: seconds between resource checks")
    p.add_argument("-u", "--users", type=int)
    p.add_argument("-r", "--spawn-rate", type=float)
    p.add_argument("-t", "--run-time")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--scenario", default="all", choices=("all", "single", "multiturn", "shared-prefix"))
    p.add_argument("--user-classes", nargs="*", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the server it starts (default: demo)")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--pool-name", help="KV pool name for the server it starts (default: loadtest-<pid>)")
    p.add_argument("--grpc-url"), p.add_argument("--http-url"), p.add_argument("--metrics-url")
    p.add_argument("--server-pgid", type=int, help="an existing server's process group (tritonserver's pid): "
                                                   "the soak samples its RSS and open files")
    args = p.parse_args(argv)
    preset = SOAK_PRESET if args.soak else CI_PRESET if args.ci else FULL_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.user_classes is None:
        args.user_classes = SOAK_USERS if args.soak else ["GrpcChatUser", "HttpStreamUser"]
    external = [args.grpc_url, args.http_url, args.metrics_url]
    if any(external) and not all(external):
        p.error("an existing server needs all of --grpc-url, --http-url and --metrics-url")
    if args.soak and args.grpc_url and args.server_pgid is None:
        p.error("--soak against an existing server needs --server-pgid")
    return args


@contextlib.contextmanager
def server_for(args):
    if args.grpc_url:
        yield args.grpc_url, args.http_url, args.metrics_url, args.server_pgid
        return
    from managed_server import managed_server

    t0 = time.monotonic()
    with managed_server(args.checkpoint, pool_name=args.pool_name or f"loadtest-{os.getpid()}",
                        instances=args.instances) as server:
        print(f"server ready in {time.monotonic() - t0:.1f}s: gRPC {server.grpc_url}, HTTP {server.http_url}",
              flush=True)
        yield server.grpc_url, server.http_url, server.metrics_url, server.process.pid


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "locust")
    monitor = None
    with server_for(args) as (grpc_url, http_url, metrics_url, server_pgid):
        before = counter_totals(metrics_url)
        if args.soak:
            from soak import SoakMonitor

            monitor = SoakMonitor(metrics_url, server_pgid, args.check_every)
            monitor.sample()
            monitor.start()
        cmd = [sys.executable, "-m", "locust", "-f", os.path.join(HERE, "locustfile.py"), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time, "--stop-timeout", "120",
               "--csv", prefix, "--csv-full-history", "--html", prefix + ".html", "--only-summary",
               "--grpc-url", grpc_url, "--http-url", http_url, "--metrics-url", metrics_url,
               "--scenario", args.scenario, "--max-tokens", str(args.max_tokens), "--loglevel", "WARNING",
               *args.user_classes]
        print("$ " + " ".join(cmd), flush=True)
        locust_rc = subprocess.call(cmd, cwd=args.out)
        if monitor is not None:
            monitor.stop()
        # the locustfile checked the pool at quit; check again from here (the source of truth)
        pool = wait_for_baseline(metrics_url, timeout_s=30)
        after = counter_totals(metrics_url)
    delta = {k: after[k] - before[k] for k in PREFIX_COUNTERS}
    rows = summary.summarize(summary.read_stats(prefix + "_stats.csv"))
    failures = sum(r["failures"] for r in rows)
    turns = sum(r["turns"] for r in rows)
    queried = delta["tritonkv_prefix_query_blocks_total"]
    extra = {
        "command": " ".join(sys.argv),
        "users": args.users, "run_time": args.run_time, "max_tokens": args.max_tokens, "scenario": args.scenario,
        "turns": turns, "failures": failures,
        "prefix_cache_block_hit_rate": None if not queried else delta["tritonkv_prefix_hit_blocks_total"] / queried,
        "server_counters_delta": delta,
        "pool_at_end": pool.describe(), "pool_at_baseline": pool.at_baseline,
        "locust_exit_code": locust_rc,
    }
    soak_ok = True
    if monitor is not None:
        soak_ok, problems = monitor.verdict(max_live=2 * args.users)
        extra.update(soak_samples=monitor.as_dicts(), soak_bounded=soak_ok, soak_problems=problems)
    table = summary.write_summary(rows, extra, os.path.join(args.out, "summary.md"),
                                  os.path.join(args.out, "summary.json"))
    if monitor is not None:
        with open(os.path.join(args.out, "summary.md"), "a") as f:
            f.write("\n## Soak: bounded resources\n\n" + monitor.table() + "\n\n"
                    + ("bounded" if soak_ok else "NOT bounded: " + "; ".join(extra["soak_problems"])) + "\n")
        print(monitor.table())
    print(table)
    hit_rate = extra["prefix_cache_block_hit_rate"]
    print(f"turns {turns}, failures {failures}; prefix-cache block hit rate "
          f"{'-' if hit_rate is None else format(hit_rate, '.2f')}; pool at end: {pool.describe()}")
    print(f"reports: {prefix}_stats.csv, {prefix}.html, {os.path.join(args.out, 'summary.md')}")
    if not pool.at_baseline:
        print("FAIL: the pool is not back to baseline (KV blocks used or sequences live after the run)")
        return 3
    if not soak_ok:
        print("FAIL: soak resources not bounded: " + "; ".join(extra["soak_problems"]))
        return 4
    if failures or turns == 0 or locust_rc != 0:
        print(f"FAIL: {failures} failed turns of {turns}; locust exit code {locust_rc}")
        return 1
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
