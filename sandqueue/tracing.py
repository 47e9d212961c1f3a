"""OpenTelemetry tracing: one trace per task, from the producer's submit through every
attempt's phases on the workers. Off by default.

With `SANDQUEUE_TRACING=off` (the default) nothing is set up: no provider, no exporter, no
thread, no network; `enabled()` is False and callers skip their span code entirely, so a
submit of 10,000 tasks pays nothing. `otlp` exports over OTLP/HTTP
(`SANDQUEUE_TRACING_ENDPOINT`, or the exporter's own `OTEL_EXPORTER_OTLP_*` variables; needs
the `otlp` extra: `pip install 'sandqueue[otlp]'`); `console` prints spans to stdout.

The producer starts a `sandqueue.submit` span per task and carries its W3C trace context
in the task message (`TaskMessage.trace`, covered by the message signature like every other
field); workers continue that trace, so the spans of every delivery of a task, on whatever
machine, are one trace.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

from sandqueue import errors

if TYPE_CHECKING:  # OpenTelemetry is imported only by a process that traces
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

_lock = threading.Lock()
_provider: Any = None


def enabled() -> bool:
    """Whether this process traces (a provider was set up here)."""
    return _provider is not None


def setup(mode: str, service_name: str, endpoint: str | None = None,
          exporter: Any = None) -> None:
    """Set this process's tracer provider once. `exporter` (tests: an in-memory one) wins
    over `mode`; `mode` off with no exporter does nothing at all."""
    global _provider
    if exporter is None and mode == "off":
        return
    with _lock:
        if _provider is not None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(_exporter(mode, endpoint)))
        _provider = provider


def _exporter(mode: str, endpoint: str | None) -> Any:
    if mode == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stdout)  # today's stdout, not the one at import
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise errors.ConfigError(
            "SANDQUEUE_TRACING=otlp needs the OTLP exporter: pip install 'sandqueue[otlp]' "
            "(or set SANDQUEUE_TRACING=off)") from e
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


def reset() -> None:
    """Forget the provider (tests), flushing what it holds."""
    global _provider
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _provider = None


def tracer() -> Tracer:
    from opentelemetry import trace

    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer("sandqueue")


def carrier(span: Span) -> dict[str, str]:
    """The W3C headers (`traceparent`, maybe `tracestate`) that continue `span` elsewhere."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out, context=trace.set_span_in_context(span))
    return out


def parent(headers: dict[str, str] | None) -> Context | None:
    """The context a message's trace headers name (None: start a new trace)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not headers:
        return None
    return TraceContextTextMapPropagator().extract(headers)


def ns(epoch_s: float) -> int:
    """Epoch seconds as the nanoseconds OpenTelemetry's start/end times take."""
    return int(epoch_s * 1e9)
