"""Locust users for tritonkv: gRPC streaming conversations and HTTP generate_stream.

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s --stop-timeout 60 \
        --grpc-url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --metrics-url http://127.0.0.1:8002/metrics

Locust has no gRPC user: each turn is reported through ``environment.events.request`` (see
``workload.py`` for the metric rows). One locust task is one whole conversation, so a graceful
stop (``--stop-timeout``) lets it END; on ``--metrics-url`` the run checks at quit that the
server's pool is back to baseline (no block used, no live sequence) and fails the run if not.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time

from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: grpc's threads must cooperate with gevent

from locust import User, between, events, task  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.join(os.path.dirname(HERE), "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

import workload  # noqa: E402
from tritonkv_client import Client, HttpClient  # noqa: E402
from tritonkv_client.metrics import pool_snapshot, wait_for_baseline  # noqa: E402


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--grpc-url", default="127.0.0.1:8001", help="tritonkv gRPC address")
    parser.add_argument("--http-url", default="127.0.0.1:8000", help="tritonkv HTTP address")
    parser.add_argument("--metrics-url", default="", help="Prometheus URL; set = check the pool at quit")
    parser.add_argument("--scenario", default="all", choices=("all",) + workload.SCENARIOS)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--think-time", type=float, default=0.0, help="max seconds a user waits between tasks")
    parser.add_argument("--baseline-timeout", type=float, default=30.0)


@events.test_start.add_listener
def _(environment, **_kw):
    url = environment.parsed_options.metrics_url
    if url:
        environment.pool_at_start = pool_snapshot(url)


@events.quitting.add_listener
def _(environment, **_kw):
    # close the gRPC channels of dropped streams now, while gevent's hub runs: a channel
    # closed from __del__ at interpreter exit can block forever under gevent
    gc.collect()
    url = environment.parsed_options.metrics_url
    if not url:
        return
    snap = wait_for_baseline(url, environment.parsed_options.baseline_timeout)
    print(f"tritonkv pool at quit: {snap.describe()}", file=sys.stderr)
    if not snap.at_baseline:
        print("FAIL: KV blocks still used or sequences still live after every conversation ended",
              file=sys.stderr)
        environment.process_exit_code = 3


class _TritonKVUser(User):
    abstract = True
    protocol = ""

    def wait_time(self):
        return random.uniform(0, self.environment.parsed_options.think_time)

    def on_start(self):
        opts = self.environment.parsed_options
        self.rng = random.Random()
        self.settings = dict(max_tokens=opts.max_tokens, temperature=0.0, ignore_eos=True)
        self.scenarios = workload.SCENARIOS if opts.scenario == "all" else (opts.scenario,)

    @task
    def run_scenario(self):
        scenario = self.rng.choice(self.scenarios)
        getattr(self, scenario.replace("-", "_"))(f"{self.protocol} {scenario}")

    def turn(self, name: str, call):
        """Run one turn; report it; return its result (None when it failed)."""
        started = time.perf_counter()
        try:
            result = call()
        except Exception as e:  # every server or transport error is a locust failure
            workload.report_turn(self.environment.events.request, name, exception=e, started_at=started)
            return None
        workload.report_turn(self.environment.events.request, name, result)
        return result


class GrpcChatUser(_TritonKVUser):
    """Conversations on ``llm`` over one gRPC stream per conversation (sequence ids)."""

    protocol = "grpc"

    def on_start(self):
        super().on_start()
        self.client = Client(self.environment.parsed_options.grpc_url, **self.settings)

    def on_stop(self):
        self.client.close()

    def single(self, name):
        with self.client.conversation() as conv:
            self.turn(name, lambda: conv.send(workload.single_prompt(self.rng), end=True).result())

    def shared_prefix(self, name):
        with self.client.conversation() as conv:
            self.turn(name, lambda: conv.send(workload.shared_prefix_prompt(self.rng), end=True).result())

    def multiturn(self, name):
        turns = workload.chat_turns(self.rng)
        with self.client.conversation() as conv:
            for i, text in enumerate(turns):
                previous = list(conv.turns)

                def one_turn():
                    result = conv.send(text, end=i == len(turns) - 1).result()
                    workload.check_kv_reuse(result, previous)
                    return result

                if self.turn(name, one_turn) is None:
                    return  # the conversation closes (END) on leaving the with block


class HttpStreamUser(_TritonKVUser):
    """One-shot HTTP ``generate_stream`` on ``llm_stateless`` (one event per token)."""

    protocol = "http"

    def on_start(self):
        super().on_start()
        self.client = HttpClient(self.environment.parsed_options.http_url, **self.settings)

    def single(self, name):
        self.turn(name, lambda: self.client.generate_stream(workload.single_prompt(self.rng)).result())

    def shared_prefix(self, name):
        self.turn(name, lambda: self.client.generate_stream(workload.shared_prefix_prompt(self.rng)).result())

    def multiturn(self, name):
        history = ""
        for text in workload.chat_turns(self.rng):
            history += text
            result = self.turn(name, lambda: self.client.generate_stream(history).result())
            if result is None:
                return
            history += result.text


class ChaosUser(_TritonKVUser):
    """Abandons work mid-reply: a gRPC conversation turn cancelled after its first token (the
    server must release its KV), an HTTP stream whose connection is dropped after its first
    event. A turn counts as a success when the server behaved: the cancel was acknowledged or
    the stream was open when dropped."""

    protocol = "chaos"

    def on_start(self):
        super().on_start()
        opts = self.environment.parsed_options
        self.settings["max_tokens"] = max(opts.max_tokens, 16)
        self.client = Client(opts.grpc_url, **self.settings)
        self.http = HttpClient(opts.http_url, **self.settings)

    def on_stop(self):
        self.client.close()

    def single(self, name):
        def cancel_after_first_token():
            with self.client.conversation() as conv:
                turn = conv.send(workload.single_prompt(self.rng))
                next(iter(turn))
                turn.cancel()
            return None

        self._abandon(f"{name} cancel", cancel_after_first_token)

    def shared_prefix(self, name):
        def drop_connection():
            stream = self.http.generate_stream(workload.shared_prefix_prompt(self.rng))
            next(iter(stream))
            stream._close()  # the client vanishes mid-reply
            return None

        self._abandon(f"{name} disconnect", drop_connection)

    def multiturn(self, name):
        self.single(name)

    def _abandon(self, name, call):
        started = time.perf_counter()
        try:
            call()
        except Exception as e:  # noqa: BLE001
            workload.report_turn(self.environment.events.request, name, exception=e, started_at=started)
            return
        self.environment.events.request.fire(request_type="e2e", name=name,
                                             response_time=(time.perf_counter() - started) * 1000,
                                             response_length=0, exception=None, context={})
