"""Prometheus metrics: one :class:`Metrics` per app, with its own registry.

A per-app ``CollectorRegistry`` (not prometheus-client's global one) keeps ``create_app`` free of
import-time state and lets tests build many apps in one process. Three feeds:

- :class:`MetricsMiddleware` counts HTTP requests by method, route template and status, times
  them, and counts open WebSockets;
- the conversation manager reports turns: first token, every later token (the gap since the
  previous one), ended with an outcome and usage; admission (:mod:`streaming_llm.chat.admission`)
  reports what generates and what waits, the chat socket its queue;
- ``GET /metrics`` takes a fresh engine health report, which :class:`_EngineCollector` turns into
  readiness, the engine/model info, and the engine's own numbers (``EngineHealth.extra``): keys
  ``cached_conversations`` and ``kv_tokens`` get metrics of their own, every other numeric key
  becomes ``streaming_llm_engine_stat{key=...}``; a backend pool's ``backends`` list becomes
  ``streaming_llm_backend_up``, ``_active_turns``, ``_turns_total`` and ``_failures_total``, each
  labelled with the backend's URL.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engines.base import EngineHealth
from .wire import Usage

FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300)


@dataclass
class EngineSnapshot:
    name: str
    health: EngineHealth
    failure: str | None  # why the engine could not start


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "streaming_llm_http_requests", "HTTP requests answered, by method, route and status.",
            ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram(
            "streaming_llm_http_request_duration_seconds",
            "Time to answer an HTTP request (a streamed answer counts until its end).",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)
        self.websockets = Gauge("streaming_llm_websockets_active", "Open chat sockets.",
                                registry=r)
        self.turns_queued = Gauge(
            "streaming_llm_turns_queued", "Chat turns waiting on their socket for the one before.",
            registry=r)
        self.turns_active = Gauge(
            "streaming_llm_turns_active",
            "Turns generating now: holding a generation slot, so running in the engine.",
            registry=r)
        self.turns_waiting = Gauge(
            "streaming_llm_turns_waiting",
            "Turns waiting to generate, by what they wait for: a generation slot (slot) or "
            "their conversation's previous turn (conversation).", ["on"], registry=r)
        self.generation_slots = Gauge(
            "streaming_llm_generation_slots",
            "Turns that may generate at once: the engine's batch, or "
            "STREAMING_LLM_MAX_CONCURRENT_GENERATIONS if lower or the engine reports none.",
            registry=r)
        self.turns = Counter("streaming_llm_turns", "Turns ended, by outcome (finish reason).",
                             ["outcome"], registry=r)
        self.prompt_tokens = Counter("streaming_llm_prompt_tokens",
                                     "Prompt tokens of ended turns, as the engine counted them.",
                                     registry=r)
        self.generated_tokens = Counter("streaming_llm_generated_tokens",
                                        "Tokens generated (completion tokens of ended turns).",
                                        registry=r)
        self.first_token = Histogram(
            "streaming_llm_time_to_first_token_seconds",
            "From a turn's arrival to its first answer piece.", buckets=FIRST_TOKEN_BUCKETS,
            registry=r)
        self.inter_token = LoopHistogram(
            "streaming_llm_inter_token_seconds", "Gap between consecutive answer pieces.",
            INTER_TOKEN_BUCKETS)
        r.register(self.inter_token)
        self.connections_refused = Counter(
            "streaming_llm_connections_refused",
            "Connections refused or closed by a cap or deadline, by reason "
            "(too_many_connections, too_many_connections_per_address, header_timeout, "
            "headers_too_large).", ["reason"], registry=r)
        self.engine: EngineSnapshot | None = None
        r.register(_EngineCollector(self))

    # turns (called by the conversation manager) -------------------------------------------------
    def connection_refused(self, reason: str) -> None:
        """Called by the server's connection caps (:mod:`streaming_llm.http.connections`)."""
        self.connections_refused.labels(reason).inc()

    def turn_ended(self, outcome: str, usage: Usage) -> None:
        self.turns.labels(outcome).inc()
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generated_tokens.inc(usage.completion_tokens)


class LoopHistogram(Collector):
    """A histogram observed from the event loop only: one ``bisect`` and two additions per
    observation, no lock and no per-bucket objects (prometheus-client's ``Histogram.observe``
    took ~8% of the service's CPU per streamed token). Exposed exactly as a ``Histogram``."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([], buckets, self.sum)
        yield family


class _EngineCollector(Collector):
    """Engine gauges from the latest snapshot (taken by ``GET /metrics`` just before)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.engine
        if snap is None:
            return
        ready = snap.health.ready and snap.failure is None
        yield GaugeMetricFamily("streaming_llm_engine_ready",
                                "1 when the engine is ready to generate.", value=int(ready))
        info = GaugeMetricFamily("streaming_llm_engine_info", "The engine and its model.",
                                 labels=["engine", "model"])
        info.add_metric([snap.name, snap.health.model], 1)
        yield info
        backends = (snap.health.extra or {}).get("backends")
        if isinstance(backends, list):
            yield from _backend_metrics(backends)
        numbers = {k: v for k, v in (snap.health.extra or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if "cached_conversations" in numbers:
            yield GaugeMetricFamily("streaming_llm_cached_conversations",
                                    "Conversations whose KV cache the engine keeps.",
                                    value=numbers.pop("cached_conversations"))
        if "kv_tokens" in numbers:
            yield GaugeMetricFamily("streaming_llm_kv_tokens",
                                    "Tokens held in the engine's KV caches.",
                                    value=numbers.pop("kv_tokens"))
        if numbers:
            stats = GaugeMetricFamily("streaming_llm_engine_stat",
                                      "Other numbers from the engine's health report.",
                                      labels=["key"])
            for key, value in sorted(numbers.items()):
                stats.add_metric([key], value)
            yield stats


def _backend_metrics(backends: list[dict[str, object]]) -> Iterator[Metric]:
    """Each backend of a pool, by URL: up or down, turns streaming now, turns and failures."""
    up = GaugeMetricFamily("streaming_llm_backend_up", "1 when the backend is up, 0 when down.",
                           labels=["backend"])
    active = GaugeMetricFamily("streaming_llm_backend_active_turns",
                               "Turns streaming from the backend now.", labels=["backend"])
    turns = CounterMetricFamily("streaming_llm_backend_turns",
                                "Turns started on the backend (a failover counts on each).",
                                labels=["backend"])
    failures = CounterMetricFamily("streaming_llm_backend_failures",
                                   "Times the backend was marked down.", labels=["backend"])
    for backend in backends:
        url = str(backend["url"])
        up.add_metric([url], int(backend["state"] == "up"))
        active.add_metric([url], float(str(backend["active"])))
        turns.add_metric([url], float(str(backend["turns"])))
        failures.add_metric([url], float(str(backend["failures"])))
    yield from (up, active, turns, failures)


_CONVERTOR = re.compile(r":[A-Za-z_]+}")


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times HTTP requests, counts accepted WebSockets.

    The route label is the matched route's template (``/agents/{agent_id}``), never the raw
    path, so ids cannot blow up the label set; requests no route matched are ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            label = _CONVERTOR.sub("}", route) if route else "unmatched"
            method = scope["method"]
            self.metrics.http_requests.labels(method, label, str(status)).inc()
            self.metrics.http_seconds.labels(method, label).observe(time.perf_counter() - started)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        accepted = False

        async def send_accept(message: Message) -> None:
            nonlocal accepted
            await send(message)
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                self.metrics.websockets.inc()

        try:
            await self.app(scope, receive, send_accept)
        finally:
            if accepted:
                self.metrics.websockets.dec()
