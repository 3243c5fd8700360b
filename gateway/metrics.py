"""Serving metrics with the names dashboards know (vLLM's, under the `yuan_serve:` prefix), one
registry per server, exposed in Prometheus' text format at `/metrics` on the HTTP port.

Histograms `time_to_first_token_seconds`, `time_per_output_token_seconds` (a request's mean after
its first token) and `e2e_request_latency_seconds`; counters `prompt_tokens_total`,
`generation_tokens_total` and `request_success_total{finished_reason}`, all recorded by both front
ends when a request finishes; gauges `num_requests_running`, `num_requests_waiting` and
`kv_cache_usage_perc` (KV blocks held over the blocks there are), counters `prefix_cache_queries_total`,
`prefix_cache_hits_total` (prompt tokens) and `num_preemptions_total`, read from the engine at scrape
time, with the expert load: `expert_tokens_total{expert}` and `pool_pairs_total{worker}`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "yuan_serve:"
FINISHED = {"eod": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}  # vLLM's reasons
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.gateway = None  # the Gateway whose engine the gauges read, once up
        r = self.registry
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time per output token after the first",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to last token",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.success = Counter(
            PREFIX + "request_success", "Finished requests", ["finished_reason"], registry=r
        )
        r.register(_EngineCollector(self))

    def finished(self, arrived: float, first, last, prompt_tokens: int, generated: int, reason: str) -> None:
        """Record one finished request (`first`/`last`: its first and last TokenEvents)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.success.labels(FINISHED.get(reason, reason)).inc()
        if first is not None and generated:
            self.ttft.observe(max(0.0, first.at - arrived))
            self.e2e.observe(max(0.0, last.at - arrived))
            if generated > 1:
                self.tpot.observe(max(0.0, (last.at - first.at) / (generated - 1)))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and load read from the engine at scrape time."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        gateway = self.metrics.gateway
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Sequences in the running batch")
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting to run")
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV blocks held by sequences, 0 to 1")
        queries = CounterMetricFamily(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        hits = CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache")
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted to free KV blocks")
        experts = CounterMetricFamily(
            PREFIX + "expert_tokens", "Tokens routed to each expert", labels=["expert"]
        )
        pools = CounterMetricFamily(
            PREFIX + "pool_pairs", "Pairs computed by each pool worker", labels=["worker"]
        )
        if gateway is not None:
            s = gateway.stats()
            running.add_metric([], s["running"])
            waiting.add_metric([], s["waiting"])
            usage.add_metric([], s["kv_blocks_used"] / max(1, s["kv_blocks_total"]))
            queries.add_metric([], s["prefix_cache_queries"])
            hits.add_metric([], s["prefix_cache_hits"])
            preemptions.add_metric([], s["preemptions"])
            for e, n in enumerate(map(sum, zip(*s.get("expert_tokens", [])))):
                experts.add_metric([str(e)], n)
            for w, n in s.get("worker_pairs", {}).items():
                pools.add_metric([str(w)], n)
        yield from (running, waiting, usage, queries, hits, preemptions, experts, pools)
