"""Prometheus metrics under vLLM's names with a `minimind:` prefix (dashboards made for vLLM carry over).

Latencies are measured here, on the stream of deltas the server receives, so both backends report the same
way. Each app gets its own registry, so several servers in one process (tests) do not collide.

With several API processes (--api-server-count), `minimind serve` sets PROMETHEUS_MULTIPROC_DIR before it
starts them: prometheus_client then keeps every process's counters and histograms in files there, and a scrape of
any process reports the sum over all of them. The engine's gauges (running, waiting, cache use) are read from
the one engine at scrape time, never summed.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from engine.backend import Backend, CompletionDelta

PREFIX = "minimind:"
# vLLM's bucket edges (seconds), so latency histograms line up with vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineGauges(Collector):
    """The engine's own numbers, read at scrape time so that they are never stale."""

    def __init__(self, backend: Backend, model_name: str) -> None:
        self.backend, self.model_name = backend, model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.backend.stats()
        for name, documentation, value in (
            ("num_requests_running", "Requests in the running batch", stats.running),
            ("num_requests_waiting", "Requests waiting for a batch slot", stats.waiting),
            ("kv_cache_usage_perc", "KV cache in use, 0..1", stats.cache_usage),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        for name, documentation, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
        ):
            counter = CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        steps = CounterMetricFamily(
            PREFIX + "engine_steps", "Engine steps run, by kind (native engine)", labels=["model_name", "kind"]
        )
        steps.add_metric([self.model_name, "prefill"], stats.prefill_steps)
        steps.add_metric([self.model_name, "decode"], stats.decode_steps)
        yield steps


class ServerMetrics:
    def __init__(self, backend: Backend, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.engine = EngineGauges(backend, model_name)
        r.register(self.engine)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated", labels, registry=r)
        self.request_success = Counter(
            f"{PREFIX}request_success", "Finished completions", labels + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token", labels, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between output deltas",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Request latency", labels, buckets=E2E_BUCKETS, registry=r
        )

        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)  # export zeros before the first request, so scrapers see every series

    def record_abort(self) -> None:
        """A request that ended early (client gone, error): counted as finished with reason "abort", as vLLM does."""
        self.request_success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, folder)
        every_process.register(self.engine)
        return generate_latest(every_process)

    async def track(self, deltas: AsyncIterator[CompletionDelta], started: float) -> AsyncIterator[CompletionDelta]:
        """Pass deltas through unchanged, observing TTFT, inter-token latency, e2e latency and token counts."""
        name = self.model_name
        # the labelled children, looked up once per request instead of once per token
        generation_tokens, itl = self.generation_tokens.labels(name), self.itl.labels(name)
        last: dict[int, float] = {}
        counted_prompt = False
        async for delta in deltas:
            now = time.perf_counter()
            if not counted_prompt and delta.num_prompt_tokens:
                self.prompt_tokens.labels(name).inc(delta.num_prompt_tokens)
                counted_prompt = True
            if delta.token_ids:
                count = len(delta.token_ids)
                generation_tokens.inc(count)
                # One inter-token observation per token after the first, as an engine counts them; a delta that
                # carries several tokens (a stream read late) spreads its gap evenly over them.
                if delta.index in last:
                    gap, observations = (now - last[delta.index]) / count, count
                else:
                    if not last:
                        self.ttft.labels(name).observe(now - started)
                    gap, observations = 0.0, count - 1
                for _ in range(observations):
                    itl.observe(gap)
                last[delta.index] = now
            if delta.finished:
                self.request_success.labels(name, delta.finish_reason or "stop").inc()
            yield delta
        self.e2e.labels(name).observe(time.perf_counter() - started)
