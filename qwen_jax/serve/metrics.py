"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Request-level figures (HTTP statuses, finish reasons, latencies) are recorded by the server as
requests happen; engine-level ones (queue, slots, token totals, tokens/s) are read from
`Engine.stats()` at each scrape.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_RATE_WINDOW_S = 10.0


class ServerMetrics:
    """Counters, gauges and histograms exposed at /metrics (names prefixed `qwen_jax_`)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "qwen_jax_http_requests", "HTTP requests by path and status code", ["path", "status"], registry=r
        )
        self.requests = Counter(
            "qwen_jax_requests", "Generation requests (one per choice) by finish reason", ["finish_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "qwen_jax_time_to_first_token_seconds",
            "From request arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "qwen_jax_inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "qwen_jax_request_latency_seconds",
            "From request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine counters and gauges, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._token_samples: collections.deque[tuple[float, int]] = collections.deque()

    def collect(self):
        stats = self.engine.stats()
        yield CounterMetricFamily("qwen_jax_prompt_tokens", "Prompt tokens prefilled", value=stats.prompt_tokens)
        yield CounterMetricFamily("qwen_jax_generation_tokens", "Tokens generated", value=stats.generated_tokens)
        yield GaugeMetricFamily("qwen_jax_queue_length", "Requests waiting for a decode slot", value=stats.waiting)
        yield GaugeMetricFamily("qwen_jax_slots_in_use", "Decode slots holding a request", value=stats.running)
        yield GaugeMetricFamily("qwen_jax_slots", "Decode slots", value=stats.slots)
        yield CounterMetricFamily("qwen_jax_decode_steps", "Decode steps run", value=stats.decode_steps)
        yield CounterMetricFamily(
            "qwen_jax_decode_rows",
            "Rows computed by decode steps (a step runs the narrowest compiled width covering its occupied slots)",
            value=stats.decode_rows,
        )
        yield CounterMetricFamily(
            "qwen_jax_prefill_chunks",
            "Prompt chunks prefilled by decode steps (chunked prefill fused with decoding)",
            value=stats.prefill_chunks,
        )
        yield CounterMetricFamily(
            "qwen_jax_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            value=stats.prefix_cache_queried_tokens,
        )
        yield CounterMetricFamily(
            "qwen_jax_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (copied, not prefilled)",
            value=stats.prefix_cache_hit_tokens,
        )
        yield GaugeMetricFamily(
            "qwen_jax_prefix_cache_blocks", "Blocks of the prefix cache (0: off)", value=stats.prefix_cache_blocks
        )
        yield GaugeMetricFamily(
            "qwen_jax_prefix_cache_blocks_used",
            "Blocks of the prefix cache in use",
            value=stats.prefix_cache_blocks_used,
        )
        yield CounterMetricFamily(
            "qwen_jax_prefix_cache_blocks_evicted",
            "Blocks evicted from the prefix cache (least recently used first)",
            value=stats.prefix_cache_blocks_evicted,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_steps",
            "Decode steps that checked proposed tokens (speculative decoding)",
            value=stats.speculative_steps,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_row_steps",
            "Decoding rows of the speculative steps (each got its accepted proposals plus one token)",
            value=stats.speculative_row_steps,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_proposed_tokens",
            "Tokens proposed (n-gram lookup)",
            value=stats.speculative_proposed_tokens,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_accepted_tokens",
            "Proposed tokens the model accepted",
            value=stats.speculative_accepted_tokens,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_skipped_steps",
            "Decode steps that did not speculate because more rows decoded than --speculative-max-rows",
            value=stats.speculative_skipped_steps,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_pauses",
            "Times a request stopped proposing because its acceptance fell below --speculative-min-acceptance",
            value=stats.speculative_pauses,
        )
        yield CounterMetricFamily(
            "qwen_jax_speculative_draft_catch_up_tokens",
            "Tokens the draft model read to catch up with its request (prompts, tokens decoded without speculation)",
            value=stats.speculative_draft_catch_up_tokens,
        )
        yield GaugeMetricFamily(
            "qwen_jax_speculative_acceptance_rate",
            "Accepted / proposed tokens since start (0 before any proposal)",
            value=stats.speculative_acceptance_rate,
        )
        yield GaugeMetricFamily(
            "qwen_jax_speculative_tokens_per_step",
            "Tokens a row got per speculative step since start (1 + accepted proposals; 0 before any)",
            value=stats.speculative_tokens_per_step,
        )
        yield GaugeMetricFamily(
            "qwen_jax_generation_tokens_per_second",
            f"Tokens generated per second over the last {_TOKEN_RATE_WINDOW_S:.0f} s",
            value=self._rate(stats.generated_tokens),
        )

    def _rate(self, generated: int) -> float:
        """Tokens/s between the oldest scrape inside the window and now (0 before a second scrape)."""
        with self._lock:
            now = time.monotonic()
            samples = self._token_samples
            samples.append((now, generated))
            while len(samples) > 2 and now - samples[1][0] >= _TOKEN_RATE_WINDOW_S:
                samples.popleft()
            then, generated_then = samples[0]
            return (generated - generated_then) / (now - then) if now > then else 0.0


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
