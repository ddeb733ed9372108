"""Span batches: the SDK's batching contract, kept with less work per span."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_value
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import kiban
from kiban.config import Settings
from kiban.export import SpanBatcher
from kiban.security import NoSecurity
from tests.conftest import Lines


class Recorder(SpanExporter):
    """An exporter that keeps each batch it is given, and can be held up."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.suppressed: list[bool] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.failures = 0
        self.closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.suppressed.append(bool(get_value(_SUPPRESS_INSTRUMENTATION_KEY)))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("collector unreachable")
        self.batches.append([span.name for span in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.closed = True

    def names(self) -> list[str]:
        return [name for batch in self.batches for name in batch]


def spans(batcher: SpanBatcher, count: int, prefix: str = "s", sampled: bool = True) -> None:
    provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
    provider.add_span_processor(batcher)
    tracer = provider.get_tracer("test")
    for number in range(count):
        tracer.start_span(f"{prefix}{number}").end()


def eventually(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_full_batches_go_to_the_exporter_in_order_off_the_callers_thread() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=4, delay=30)
    spans(batcher, 10)
    eventually(lambda: len(exporter.batches) == 2)
    assert exporter.batches == [["s0", "s1", "s2", "s3"], ["s4", "s5", "s6", "s7"]]
    assert exporter.threads == {"kiban-span-export"}
    assert exporter.suppressed == [True, True]  # the exporter's own calls are not traced
    batcher.shutdown()
    assert exporter.names() == [f"s{number}" for number in range(10)]
    assert exporter.closed


def test_a_batch_that_does_not_fill_goes_out_after_the_delay() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=512, delay=0.1)
    spans(batcher, 3)
    eventually(lambda: exporter.batches == [["s0", "s1", "s2"]], seconds=2)
    spans(batcher, 2, prefix="t")
    eventually(lambda: exporter.batches[1:] == [["t0", "t1"]], seconds=2)
    batcher.shutdown()


def test_force_flush_exports_everything_ended_before_it_returns() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=4, delay=30)
    spans(batcher, 6)
    assert batcher.force_flush()
    assert exporter.names() == [f"s{number}" for number in range(6)]
    batcher.shutdown()


def test_unsampled_spans_are_not_exported() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=2, delay=30)
    spans(batcher, 5, sampled=False)
    batcher.force_flush()
    assert exporter.batches == []
    batcher.shutdown()


def test_after_shutdown_spans_are_dropped_and_flush_says_so() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=4, delay=30)
    spans(batcher, 2)
    batcher.shutdown()
    batcher.shutdown()  # twice is harmless
    assert exporter.names() == ["s0", "s1"]
    spans(batcher, 2, prefix="late")
    assert batcher.force_flush() is False
    assert exporter.names() == ["s0", "s1"]


def test_a_slow_exporter_costs_the_oldest_spans_counted_in_a_warning(lines: Lines) -> None:
    exporter = Recorder()
    exporter.gate.clear()  # the collector hangs
    batcher = SpanBatcher(exporter, max_batch=2, max_queue=4, delay=30)
    spans(batcher, 2)  # the worker takes this batch and waits on the exporter
    assert exporter.entered.wait(5)
    spans(batcher, 10, prefix="t")  # four wait; each later one pushes out the oldest
    assert batcher.dropped == 6
    behind = "span export is behind, dropping spans"
    warnings = [line for line in lines.app() if line["msg"] == behind]
    assert [line["dropped_total"] for line in warnings] == [1]  # once per delay, not per span
    exporter.gate.set()
    batcher.shutdown()
    assert exporter.names() == ["s0", "s1", "t6", "t7", "t8", "t9"]


def test_an_exporter_that_raises_does_not_stop_the_next_batches(lines: Lines) -> None:
    exporter = Recorder()
    exporter.failures = 1
    batcher = SpanBatcher(exporter, max_batch=2, delay=30)
    spans(batcher, 4)
    eventually(lambda: exporter.batches == [["s2", "s3"]])
    (failed,) = [line for line in lines.app() if line["msg"] == "span export failed"]
    assert failed["level"] == "warning"
    assert failed["spans"] == 2
    assert "collector unreachable" in failed["error"]
    batcher.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_exports_its_own_spans_and_not_the_parents() -> None:
    exporter = Recorder()
    batcher = SpanBatcher(exporter, max_batch=100, delay=30)
    spans(batcher, 3, prefix="parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a worker of its own, none of the parent's held spans
        try:
            spans(batcher, 2, prefix="child")
            batcher.force_flush()
            os.write(write, orjson.dumps(exporter.batches))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = orjson.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child == [["child0", "child1"]]
    batcher.force_flush()
    assert exporter.names() == ["parent0", "parent1", "parent2"]
    batcher.shutdown()


def test_a_service_sends_its_server_spans_in_the_configured_batches() -> None:
    exporter = Recorder()
    app = FastAPI()
    settings = Settings(trace_export_batch=3, trace_export_delay=30, trace_export_queue=9)
    service = kiban.Service(app, settings, security=NoSecurity())
    batcher = service.telemetry.export_spans(exporter)
    assert (batcher.max_batch, batcher.max_queue, batcher.delay) == (3, 9, 30)

    @app.get("/items/{item_id}")
    async def get(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    with TestClient(app) as client:
        for number in range(3):
            client.get(f"/items/{number}")
        eventually(lambda: len(exporter.batches) == 1)
        assert exporter.batches == [["GET /items/{item_id}"] * 3]
    batcher.shutdown()
