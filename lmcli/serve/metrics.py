"""/metrics in Prometheus text format (prometheus-client): the engine's gauges and counters, read from its
latest snapshot, request latencies measured at the HTTP layer, and the process's memory, files and CPU time."""

import time
from typing import Callable, Optional

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no *_created series: scrapers do not need them
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class EngineCollector:
    def __init__(self, snapshot: Callable[[], Optional[dict]]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        if s is None:  # still loading
            return
        yield GaugeMetricFamily("lm_requests_running", "Sequences the engine is computing.", s["running"])
        yield GaugeMetricFamily("lm_requests_waiting", "Sequences waiting for room in the batch or the KV cache.",
                                s["waiting"])
        used = s["num_blocks"] - s["free_blocks"]
        yield GaugeMetricFamily("lm_kv_cache_blocks_used", "KV cache blocks held by sequences and sessions.", used)
        yield GaugeMetricFamily("lm_kv_cache_blocks_total", "KV cache blocks in the pool.", s["num_blocks"])
        yield GaugeMetricFamily("lm_kv_cache_usage_ratio", "Share of the KV cache in use.",
                                used / max(1, s["num_blocks"]))
        yield GaugeMetricFamily("lm_sessions", "Interactive sessions the server keeps.", s["sessions"])
        yield GaugeMetricFamily("lm_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the prefix "
                                "cache, since start.", s["prefix_hits"] / max(1, s["prefix_queries"]))
        yield CounterMetricFamily("lm_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.",
                                  s["prefix_queries"])
        yield CounterMetricFamily("lm_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.",
                                  s["prefix_hits"])
        yield CounterMetricFamily("lm_computed_tokens", "Tokens run through the model (prefill and decode).",
                                  s["computed_tokens"])
        yield CounterMetricFamily("lm_preemptions", "Sequences preempted for lack of KV cache.", s["preemptions"])


class Metrics:
    def __init__(self, snapshot: Callable[[], Optional[dict]]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot))
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, CPU seconds (Linux)
        self.requests = Counter("lm_requests", "Finished generation requests by endpoint and finish reason.",
                                ["endpoint", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lm_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("lm_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram("lm_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lm_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("lm_e2e_request_latency_seconds", "From request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's timings; done() records them."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.first: Optional[float] = None
        self.output_tokens = 0

    def tokens(self, n: int) -> None:
        if n and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)
        self.output_tokens += n
        self.metrics.generation_tokens.inc(n)

    def done(self, finish_reason: Optional[str], prompt_tokens: int) -> None:
        end = time.perf_counter()
        m = self.metrics
        m.requests.labels(self.endpoint, finish_reason or "abort").inc()
        m.prompt_tokens.inc(prompt_tokens)
        m.e2e.observe(end - self.start)
        if self.first is not None and self.output_tokens > 1:
            m.tpot.observe((end - self.first) / (self.output_tokens - 1))
