"""Ended spans handed to an exporter in batches, on a thread of their own.

Every request ends a span, so what a span costs on its way to the exporter is paid on
every request. The SDK's ``BatchSpanProcessor`` checks its state and the process id (a
system call) for each span; ``SpanBatcher`` appends the span to a bounded deque and
wakes the exporter thread once a batch is full, nothing more. A fork is noticed by an
at-fork hook, a shutdown by the deque it leaves behind, which keeps nothing.

It keeps the SDK's contract: batches of at most ``max_batch`` spans, a partial batch
exported after ``delay`` seconds, at most ``max_queue`` spans waiting for the exporter
(past that, each new span pushes out the oldest, counted), instrumentation suppressed
while exporting, and ``force_flush`` and ``shutdown`` export what is held.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.context.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

from kiban import log
from kiban.spans import ServerSpan

__all__ = ["SpanBatcher"]


class SpanBatcher(SpanProcessor):
    """``BatchSpanProcessor``'s job, for a request path that ends a span per request."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_batch: int = 512,
        max_queue: int = 2048,
        delay: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self.max_queue = max_queue
        self.max_batch = min(max_batch, max_queue)
        self.delay = delay
        self.dropped = 0
        self._closed = False
        self._start()
        batcher = weakref.ref(self)

        def after_fork() -> None:
            found = batcher()
            if found is not None and not found._closed:
                found._start()  # the child has no worker thread and must not export the parent's

        os.register_at_fork(after_in_child=after_fork)

    def _start(self) -> None:
        #: Ended spans, oldest first; when full, appending drops the oldest.
        self._spans: deque[ReadableSpan] = deque(maxlen=self.max_queue)
        self._wake = threading.Event()
        self._woken = False  # the worker has been woken for the batch being taken
        self._export_lock = threading.Lock()
        self._warned = 0.0
        self._worker = threading.Thread(target=self._work, name="kiban-span-export", daemon=True)
        self._worker.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if type(span) is not ServerSpan:  # which is sampled, or it would not be one
            context = span.context
            if context is None or not context.trace_flags.sampled:
                return
        spans = self._spans
        if len(spans) == self.max_queue:
            self._drop()
        spans.append(span)
        if len(spans) >= self.max_batch and not self._woken:
            self._woken = True
            self._wake.set()

    def _drop(self) -> None:
        """Count a span the exporter could not keep up with; say so at most every delay."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned >= self.delay:
            self._warned = now
            log.warning("span export is behind, dropping spans", dropped_total=self.dropped)

    def _work(self) -> None:
        while True:
            full = self._wake.wait(self.delay)
            self._wake.clear()
            self._woken = False
            if self._closed:  # shutdown exports what is held, once the worker has stopped
                return
            # Woken for a full batch: export full batches; after the delay, all there is.
            self._export(self._spans, full_only=full)

    def _export(self, spans: deque[ReadableSpan], full_only: bool = False) -> None:
        size = self.max_batch
        with self._export_lock:
            while len(spans) >= (size if full_only else 1):
                batch = [spans.popleft() for _ in range(min(size, len(spans)))]
                token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
                try:
                    self.exporter.export(batch)
                except Exception as exc:  # an exporter's failure must not stop the worker
                    log.warning("span export failed", error=repr(exc), spans=len(batch))
                finally:
                    detach(token)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything ended so far, here, before returning."""
        if self._closed:
            return False
        self._export(self._spans)
        return True

    def shutdown(self) -> None:
        """Export what is held, stop the worker and shut the exporter down."""
        if self._closed:
            return
        self._closed = True
        held, self._spans = self._spans, deque(maxlen=0)  # keeps nothing from now on
        self._wake.set()
        self._worker.join(30)
        self._export(held)
        self.exporter.shutdown()
