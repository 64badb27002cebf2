"""Prometheus metrics of the server (prometheus-client), fed by AsyncLLMEngine's step listener.

Names follow vLLM's with a `distllm:` prefix: latency histograms (TTFT, inter-token, end to
end, queue time), running/waiting gauges, KV cache usage, prefix cache queries and hits,
preemptions, prompt/generation token and finished-request counters.
"""

from __future__ import annotations

from typing import Any

from distllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("distllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("distllm:inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS)
        self.e2e = hist("distllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = hist("distllm:request_queue_time_seconds", "Time from arrival to first scheduling.",
                          _LATENCY_BUCKETS)
        self.running = gauge("distllm:num_requests_running", "Requests being computed.")
        self.waiting = gauge("distllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("distllm:kv_cache_usage_perc", "KV cache usage (1 = full).")
        self.prefix_queries = counter("distllm:prefix_cache_queries", "Prefix cache queries, in tokens.")
        self.prefix_hits = counter("distllm:prefix_cache_hits", "Prefix cache hits, in tokens.")
        self.preemptions = counter("distllm:num_preemptions", "Preemptions.")
        self.prompt_tokens = counter("distllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("distllm:generation_tokens", "Generated tokens.")
        self.request_success = counter("distllm:request_success", "Requests finished.")
        self.http_requests = counter("distllm:http_requests", "HTTP requests received by the API routes.")
        self._last: dict[str, float] = {}
        self._last_token_time: dict[str, float] = {}

    def _inc_to(self, key: str, counter: Any, value: float) -> None:
        """Engine counters are cumulative: add what is new since the last step."""
        prev = self._last.get(key, 0.0)
        if value > prev:
            counter.inc(value - prev)
        self._last[key] = max(prev, value)

    def on_step(self, outputs: list[Any], stats: dict[str, Any], counters: dict[str, Any], now: float) -> None:
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        self._inc_to("pq", self.prefix_queries, stats.get("prefix_cache_queries", 0))
        self._inc_to("ph", self.prefix_hits, stats.get("prefix_cache_hits", 0))
        self._inc_to("pre", self.preemptions, stats.get("num_preemptions", 0))
        self._inc_to("pt", self.prompt_tokens, counters.get("prompt_tokens", 0))
        self._inc_to("gt", self.generation_tokens, counters.get("generation_tokens", 0))
        for out in outputs:
            self._observe(out)

    def _observe(self, out: Any) -> None:
        m = getattr(out, "metrics", None)
        rid = out.request_id
        if not isinstance(out, RequestOutput) or m is None:
            if getattr(out, "finished", False):
                self.request_success.inc()
            return
        last = self._last_token_time.get(rid)
        if m.first_token_time is not None:
            if last is None:
                self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
                if m.time_in_queue is not None:
                    self.queue.observe(m.time_in_queue)
            elif m.last_token_time is not None and m.last_token_time > last:
                self.itl.observe(m.last_token_time - last)
            if m.last_token_time is not None:
                self._last_token_time[rid] = m.last_token_time
        if out.finished:
            self._last_token_time.pop(rid, None)
            self.request_success.inc()
            end = m.finished_time or m.last_token_time
            if end is not None:
                self.e2e.observe(max(0.0, end - m.arrival_time))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
