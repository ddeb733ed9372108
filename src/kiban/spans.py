"""The request's server span: an OTel span made with as little work as a request allows.

Every request makes one, so what it costs is paid on every request: ``ServerSpan``
keeps its ids and its few known-clean values as plain fields, and makes its
``SpanContext`` and attribute map only when they are read. ``kiban.telemetry`` makes
it; ``kiban.export`` ships it with the SDK's own spans.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = ["NOT_SAMPLED", "SCOPE", "ServerSpan", "Spans", "span_context"]


def span_context(
    trace_id: int, span_id: int, flags: TraceFlags, parent: SpanContext | None
) -> SpanContext:
    """``SpanContext(trace_id, span_id, False, flags, state)`` for ids known to be valid,
    with the trace state of ``parent`` (a remote parent's is kept) or none.

    A SpanContext is a tuple whose constructor checks the ids; kiban's ids are valid by
    construction, so the tuple is made directly (a test holds it to the constructor).
    """
    state = parent.trace_state if parent is not None else DEFAULT_TRACE_STATE
    return tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, True))


#: What kiban's own spans and metrics are recorded under, as its tracer and meter are named.
SCOPE = InstrumentationScope("kiban")
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class ServerSpan(trace.Span, ReadableSpan):
    """The request's server span, recorded with the least work per request.

    The SDK's span takes a lock and cleans each attribute on every call, is built
    through the sampler and id generator, and is copied when it ends. The server span
    keeps its ids and its few known-clean values as plain fields, and makes its
    ``SpanContext`` and attribute map only when something reads them: an exporter, on
    its own thread, or a handler. An ended span waits for its batch to be exported, so
    the fewer objects it holds, the less each request allocates, keeps and frees. It is
    its own ``ReadableSpan``: once ended it changes no more, and goes as it is to the
    same span processors and exporters as any other (processors see it at ``on_end``;
    ``on_start`` is not called for it). Attributes and events a handler adds go through
    the SDK's bounded attribute map.
    """

    # What every server span shares is read from the class; a request sets the rest.
    _kind = SpanKind.SERVER
    _instrumentation_scope = SCOPE
    _instrumentation_info = None
    _status = _UNSET
    _parent: SpanContext | None = None
    _events: Sequence[Event] = ()  # lists once a handler adds one
    _links: Sequence[Link] = ()
    _end_time: int | None = None
    _status_code: int | None = None  # the response's, set as the request ends
    _route: str | None = None
    _made_context: SpanContext | None = None
    _set: BoundedAttributes | None = None  # the attributes, once a handler sets one

    def __init__(  # ReadableSpan's fields are set here, without its defaults
        self,
        method: str,
        path: str,
        scheme: str,
        client: str,
        trace_id: int,
        span_id: int,
        parent: SpanContext | None,
        owner: Spans,
    ) -> None:
        self._name = method
        self._method = method
        self._path = path
        self._scheme = scheme
        self._client = client
        self._trace_id = trace_id
        self._span_id = span_id
        if parent is not None:
            self._parent = parent
        self._owner = owner
        self._start_time = time.time_ns()

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        context = self._made_context
        if context is None:
            context = span_context(self._trace_id, self._span_id, _SAMPLED, self._parent)
            self._made_context = context
        return context

    @property
    def _attributes(self) -> Mapping[str, AttributeValue]:  # type: ignore[override]
        found = self._set
        return found if found is not None else self._own()

    @property
    def _resource(self) -> Resource:  # type: ignore[override]
        return self._owner.resource

    def _own(self) -> dict[str, AttributeValue]:
        """The semantic-convention attributes kiban records for every request."""
        attributes: dict[str, AttributeValue] = {
            "http.request.method": self._method,
            "url.path": self._path,
            "url.scheme": self._scheme,
            "client.address": self._client,
        }
        if self._status_code is not None:
            attributes["http.response.status_code"] = self._status_code
        if self._route:
            attributes["http.route"] = self._route
        return attributes

    def finish(self, status: int, route: str | None, name: str | None) -> None:
        """Record the response's status and the matched route, then end."""
        self._status_code = status
        if route:
            self._route = route
        if name is not None:
            self._name = name
        found = self._set
        if found is not None:
            found["http.response.status_code"] = status
            if route:
                found["http.route"] = route
        if status >= 500:
            self.set_status(_ERROR)
        self.end()

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is not None:
            return
        found = self._set
        if found is None:
            limits = self._owner.limits
            found = self._set = BoundedAttributes(
                limits.max_span_attributes,
                self._own(),
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        found[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            return
        limits = self._owner.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            immutable=True,
            max_value_len=limits.max_attribute_length,
        )
        self._events = [*self._events, Event(name, bounded, timestamp)]

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = [*self._links, Link(context, attributes)]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        recorded: dict[str, AttributeValue] = {
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        owner = self._owner
        if owner.synchronous is None:
            owner.processor.on_end(self)
            return
        # The provider's processors in turn, as its own processor would call them, minus
        # an interpreted loop; its tuple is replaced, not changed, when one is added.
        for processor in owner.synchronous._span_processors:
            processor.on_end(self)


class Spans:
    """What a ServerSpan needs from its tracer provider, looked up once."""

    def __init__(self, provider: TracerProvider, ratio: float) -> None:
        sdk_tracer = provider.get_tracer("kiban")
        self.processor: SpanProcessor = sdk_tracer.span_processor  # type: ignore[attr-defined]
        self.synchronous = (
            self.processor if type(self.processor) is SynchronousMultiSpanProcessor else None
        )
        self.resource = provider.resource
        self.limits = sdk_tracer._span_limits  # type: ignore[attr-defined]
        self.bound = TraceIdRatioBased.get_bound_for_rate(ratio)
