"""GET /metrics in Prometheus's text format: the engine loop's state and totals, read from its
stats() when scraped (no polling), and the server's own request counts and TTFT histogram."""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (metric name, help, the LoopStats field it reads)
LOOP_GAUGES = (
    ("llmrun_requests_running", "Requests in the running batch", "num_running"),
    ("llmrun_requests_waiting", "Requests waiting to join the batch", "num_waiting"),
    ("llmrun_kv_blocks_total", "KV cache blocks in the pool", "num_blocks"),
    ("llmrun_kv_blocks_used", "KV blocks held by requests", "num_used_blocks"),
    ("llmrun_kv_blocks_cached", "KV blocks held by no request, kept for prefix hits (reclaimable)",
     "num_cached_blocks"),
    ("llmrun_kv_blocks_free", "KV blocks neither held nor cached", "num_free_blocks"),
)
LOOP_COUNTERS = (  # exposed with Prometheus's _total suffix
    ("llmrun_prompt_tokens", "Prompt tokens of admitted requests", "prompt_tokens"),
    ("llmrun_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", "prefix_queried_tokens"),
    ("llmrun_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", "prefix_hit_tokens"),
    ("llmrun_generation_tokens", "Tokens generated", "generated_tokens"),
    ("llmrun_requests_finished", "Requests that ran to their end", "num_finished"),
    ("llmrun_requests_aborted", "Requests cancelled (client gone, shutdown)", "num_aborted"),
    ("llmrun_preemptions", "Requests preempted (blocks freed, recomputed later)", "num_preemptions"),
)


class _LoopCollector:
    """The engine loop's last snapshot, read when /metrics is scraped (nothing while loading)."""

    def __init__(self, stats: Callable[[], Optional[object]]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        if stats is None:
            return
        for name, help_text, field in LOOP_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(stats, field))
        for name, help_text, field in LOOP_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats, field))
        queried = stats.prefix_queried_tokens
        yield GaugeMetricFamily("llmrun_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / "
                                "prompt tokens looked up", value=stats.prefix_hit_tokens / queried if queried else 0.0)


class ServerMetrics:
    """The server's registry (never the process-global one): the loop's figures, HTTP answers by
    endpoint and status, and the time from a request's arrival to its first token."""

    def __init__(self, loop_stats: Callable[[], Optional[object]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("llmrun_http_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.ttft = Histogram("llmrun_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_LoopCollector(loop_stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
