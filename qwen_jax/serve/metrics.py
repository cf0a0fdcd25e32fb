"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_RATE_WINDOW_S = 10.0


class ServerMetrics:
    """Counters, gauges and histograms exposed at /metrics (names prefixed `qwen_jax_`)."""

    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("qwen_jax_http_requests", "HTTP requests by path and status code",
                                     ["path", "status"], registry=r)
        self.requests = Counter("qwen_jax_requests", "Generation requests (one per choice) by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("qwen_jax_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("qwen_jax_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("qwen_jax_queue_length", "Requests waiting for a decode slot", registry=r)
        self.slots_in_use = Gauge("qwen_jax_slots_in_use", "Decode slots holding a request", registry=r)
        self.slots = Gauge("qwen_jax_slots", "Decode slots", registry=r)
        self.tokens_per_second = Gauge("qwen_jax_generation_tokens_per_second",
                                       f"Tokens generated per second over the last {_TOKEN_RATE_WINDOW_S:.0f} s",
                                       registry=r)
        self.time_to_first_token = Histogram("qwen_jax_time_to_first_token_seconds",
                                             "From request arrival to its first generated token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("qwen_jax_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("qwen_jax_request_latency_seconds", "From request arrival to its last token",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self._token_samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last_stats = None

    def render(self) -> bytes:
        """Refresh the gauges from the engine and return the text exposition."""
        stats = self.engine.stats()
        self.queue_length.set(stats.waiting)
        self.slots_in_use.set(stats.running)
        self.slots.set(stats.slots)
        if self._last_stats is not None:
            self.prompt_tokens.inc(stats.prompt_tokens - self._last_stats.prompt_tokens)
            self.generation_tokens.inc(stats.generated_tokens - self._last_stats.generated_tokens)
        else:
            self.prompt_tokens.inc(stats.prompt_tokens)
            self.generation_tokens.inc(stats.generated_tokens)
        self._last_stats = stats
        now = time.monotonic()
        self._token_samples.append((now, stats.generated_tokens))
        while len(self._token_samples) > 2 and now - self._token_samples[1][0] >= _TOKEN_RATE_WINDOW_S:
            self._token_samples.popleft()
        then, tokens_then = self._token_samples[0]
        self.tokens_per_second.set((stats.generated_tokens - tokens_then) / (now - then) if now > then else 0.0)
        return generate_latest(self.registry)


class RequestTimer:
    """Time to first token, inter-token latency and total latency of one generation (one choice)."""

    def __init__(self, metrics: ServerMetrics, arrived: float):
        self.metrics = metrics
        self.arrived = arrived
        self.last_token: float | None = None

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.time_to_first_token.observe(now - self.arrived)
        else:
            self.metrics.inter_token_latency.observe(now - self.last_token)
        self.last_token = now

    def finished(self, finish_reason: str) -> None:
        self.metrics.requests.labels(finish_reason=finish_reason).inc()
        self.metrics.request_latency.observe(time.perf_counter() - self.arrived)
