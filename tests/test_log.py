"""Context logging: JSON lines carrying the request context, a runtime level, a TTY mode."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban import _log as log
from kiban._config import Settings
from kiban._log import configure, set_level
from kiban.security import NoSecurity
from tests.conftest import ROOT, Lines, Process, free_port


def test_lines_are_json_with_time_level_and_fields(lines: Lines) -> None:
    log.info("order placed", order_id=17)
    (line,) = lines.all()
    assert line["msg"] == "order placed"
    assert line["order_id"] == 17
    assert line["level"] == "info"
    assert line["service"] == "test"
    assert line["time"].endswith("Z")
    assert "T" in line["time"]


def test_lines_inside_a_request_carry_trace_request_and_uid(lines: Lines) -> None:
    app = FastAPI()
    kiban.Service(app, Settings(trusted_proxies=["10.0.0.0/8"]), security=NoSecurity())

    @app.get("/")
    async def index() -> dict[str, str]:
        log.info("inside")
        return {}

    with TestClient(app, client=("10.0.0.3", 50000)) as client:  # a trusted gateway's uid
        response = client.get("/", headers={"x-uid": "u-9"})
    (line,) = [line for line in lines.app() if line["msg"] == "inside"]
    assert line["trace_id"] == response.headers["x-trace-id"]
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["uid"] == "u-9"
    log.info("outside")
    assert "trace_id" not in lines.all()[-1]


def test_level_changes_at_runtime(lines: Lines) -> None:
    log.debug("hidden")
    set_level("debug")
    log.debug("shown")
    set_level("warning")
    log.info("hidden too")
    log.warning("kept")
    assert [line["msg"] for line in lines.all()] == ["shown", "kept"]
    assert log.get_level() == "warning"


def test_stdlib_loggers_go_through_the_same_pipeline(lines: Lines) -> None:
    logging.getLogger("some.library").warning("careful %s", "now")
    (line,) = lines.all()
    assert line == {**line, "msg": "careful now", "logger": "some.library", "level": "warning"}


def test_exceptions_are_logged_as_a_traceback_string_without_frame_locals(lines: Lines) -> None:
    def fail() -> None:
        password = "hunter2-do-not-log"  # noqa: F841 - a local that must not reach the log
        raise ValueError("bad")

    try:
        fail()
    except ValueError:
        log.exception("it failed")
    (line,) = lines.all()
    assert "Traceback" in line["exception"]
    assert "ValueError: bad" in line["exception"]
    assert "hunter2" not in lines.text()


def test_a_terminal_gets_readable_lines_not_json() -> None:
    main, secondary = os.openpty()
    with os.fdopen(secondary, "wb", buffering=0) as tty:
        configure("info", "auto", stream=tty)
        try:
            log.info("hello tty", answer=42)
        finally:
            configure("info", "json", stream=sys.stdout.buffer)
        output = os.read(main, 4096).decode()
    os.close(main)
    assert "hello tty" in output
    assert "answer" in output
    assert "42" in output
    assert not output.lstrip().startswith("{")


def test_json_can_be_forced_on_a_terminal() -> None:
    main, secondary = os.openpty()
    with os.fdopen(secondary, "wb", buffering=0) as tty:
        configure("info", "json", stream=tty)
        try:
            log.info("forced")
        finally:
            configure("info", "json", stream=sys.stdout.buffer)
        output = os.read(main, 4096).decode()
    os.close(main)
    assert output.lstrip().startswith('{"')


def test_log_format_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")  # type: ignore[arg-type]


def test_importing_kiban_leaves_the_hosts_structlog_alone() -> None:
    """A host app's own structlog configuration survives import and ``configure``."""
    import subprocess

    code = """
import structlog
structlog.configure(processors=[structlog.processors.KeyValueRenderer()])
before = structlog.get_config()["processors"]
import kiban
from kiban import log
log.info("kiban still logs")
log.configure(level="info", fmt="json")
assert structlog.get_config()["processors"] == before, structlog.get_config()
log.configure(level="info", fmt="json", structlog_global=True)
assert structlog.get_config()["processors"] != before
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "kiban still logs" in done.stdout
    assert "ok" in done.stdout.splitlines()


def test_lines_go_to_stdout_as_it_is_when_written(capsys: pytest.CaptureFixture[str]) -> None:
    """The sink resolves stdout at write time, so a runner's capture sees kiban's lines."""
    previous = log.sink.stream
    log.sink.flush()
    log.sink.stream = None
    try:
        log.warning("captured line")
        log.sink.flush()
    finally:
        log.sink.stream = previous
    assert "captured line" in capsys.readouterr().out


def _buffering_app() -> FastAPI:
    app = FastAPI()
    kiban.Service(app, Settings(log_buffering=True), security=NoSecurity())

    @app.get("/work/{outcome}")
    async def work(outcome: str) -> dict[str, str]:
        kiban.log.info("step one", outcome=outcome)
        kiban.log.debug("a detail")  # under the level: never written either way
        kiban.log.info("step two", outcome=outcome)
        if outcome == "bug":
            raise RuntimeError("broken")
        if outcome == "error":
            kiban.log.error("could not charge the card")
        if outcome == "missing":
            raise kiban.Problem(404)
        return {"outcome": outcome}

    return app


def test_with_buffering_a_successful_request_writes_only_its_access_line(lines: Lines) -> None:
    with TestClient(_buffering_app()) as client:
        for _ in range(5):
            assert client.get("/work/fine").status_code == 200
        assert client.get("/work/missing").status_code == 404  # an answer, not a failure
        metrics = client.get("/metrics").text
    assert [line["msg"] for line in lines.app() if "outcome" in line] == []
    assert len([line for line in lines.access() if line["path"].startswith("/work")]) == 6
    dropped = next(line for line in metrics.splitlines() if line.startswith("kiban_log_dropped"))
    assert dropped.endswith(" 12.0")  # two lines each, six requests


def test_with_buffering_a_failing_request_writes_what_it_held_in_order(lines: Lines) -> None:
    with TestClient(_buffering_app(), raise_server_exceptions=False) as client:
        assert client.get("/work/bug").status_code == 500
        assert client.get("/work/error").status_code == 200
    bug = [line for line in lines.all() if line.get("outcome") == "bug"]
    assert [line["msg"] for line in bug] == ["step one", "step two"]
    errored = [line["msg"] for line in lines.app() if line.get("outcome") == "error"]
    assert errored == ["step one", "step two"]
    assert "could not charge the card" in [line["msg"] for line in lines.app()]
    # The held lines come before the request's access line.
    order = [line.get("msg") or line["log"] for line in lines.all()]
    assert order.index("step two") < order.index("access")


def _stalled_pipe() -> tuple[int, int]:
    """A pipe nobody reads yet, as stdout is when a log collector or its disk stalls."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    return read, write


def _drain(fd: int, until: bytes, timeout: float = 10) -> bytes:
    """Read ``fd`` until ``until`` arrives (select, not sleeps)."""
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{until!r} not read within {timeout}s; got {data[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            data += os.read(fd, 1 << 16)
    return data


def test_a_stalled_output_never_blocks_a_writer_and_the_lines_it_dropped_are_reported() -> None:
    read, write = _stalled_pipe()
    stream = os.fdopen(write, "wb")
    sink = log.Sink(stream, max_held=64 * 1024)
    lines = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 100) for n in range(4000)]  # ~470 KiB

    # The writer thread fills the pipe and blocks; the callers must not. Written from
    # a thread so that a regression fails here instead of hanging the suite.
    def log_them() -> None:
        for line in lines:
            sink.write(line, urgent=line.startswith(b'{"n":3'))

    writer = threading.Thread(target=log_them, daemon=True)
    writer.start()
    writer.join(10)
    assert not writer.is_alive(), "a log line waited on the stalled output"
    assert 0 < sink.dropped < len(lines)
    began = time.monotonic()
    assert sink.flush(timeout=0.2) is False  # a stalled output does not hold a flush
    assert time.monotonic() - began < 2

    # The output takes lines again (read from now on): what was held comes first, each
    # run of lines dropped is counted by a report in its place, then what is logged after.
    received: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(read, received), daemon=True)
    reader.start()
    assert sink.flush(timeout=5) is True
    sink.write(b'{"n":"after"}')
    assert sink.flush(timeout=5) is True
    stream.close()
    reader.join(5)
    written = [orjson.loads(raw) for raw in b"".join(received).splitlines()]
    assert written[-1] == {"n": "after"}
    following = 0  # the next line's number, as the lines and the reports so far say
    reports = []
    for record in written[:-1]:
        if "n" in record:
            assert record["n"] == following, "a line missing where no report says so"
            following += 1
        else:
            assert record["msg"] == "log lines dropped: the output did not take them"
            assert record["level"] == "warning"
            reports.append(record)
            following += record["dropped"]
    assert following == len(lines)
    assert reports, "the dropped lines were never reported"
    assert sum(report["dropped"] for report in reports) == sink.dropped
    os.close(read)


def _read_all(fd: int, into: list[bytes]) -> None:
    """Read ``fd`` until its writer closes it."""
    while True:
        select.select([fd], [], [], 5)
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not data:
            return
        into.append(data)


def test_a_flush_waits_for_a_stalled_output_a_bounded_time_and_then_not_at_all() -> None:
    read, write = _stalled_pipe()
    sink = log.Sink(os.fdopen(write, "wb"), max_held=64 * 1024)
    for n in range(2000):
        sink.write(b'{"n":%d,"pad":"%s"}' % (n, b"x" * 100))
    began = time.monotonic()
    assert sink.flush(timeout=0.3) is False  # as at exit: written, or given up on
    assert time.monotonic() - began < 1.5
    # Once a write has been stuck that long, a flush no longer waits at all: the
    # shutdown's flushes, then the one at exit, add nothing to its bound.
    began = time.monotonic()
    assert sink.flush(timeout=0.3) is False
    assert time.monotonic() - began < 0.1
    os.close(read)


def test_a_forked_child_writes_its_own_lines_and_not_the_parents() -> None:
    read, write = os.pipe()
    previous = log.sink.stream
    log.sink.flush()
    log.sink.stream = os.fdopen(write, "wb")
    try:
        log.sink.write(b"parent")  # may still be buffered when the process forks
        child = os.fork()
        if child == 0:  # the parent's writer thread is not in the child
            log.sink.write(b"child")
            os._exit(0 if log.sink.flush(timeout=5) else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert log.sink.flush(timeout=5)
        log.sink.stream.close()
        with os.fdopen(read, "rb") as output:
            assert sorted(output.read().splitlines()) == [b"child", b"parent"]
    finally:
        log.sink.stream = previous


def _service_on_a_pipe(port: int, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """``kiban run`` of the test service, its stdout and stderr a pipe nobody reads."""
    read, write = _stalled_pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "kiban", "run", "tests.apps.hello:app"],
        cwd=ROOT,
        env={
            **os.environ,
            "HTTP_PORT": str(port),
            "LOG_FORMAT": "json",
            "HTTP_DRAIN_SECONDS": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            **env,
        },
        stdout=write,
        stderr=write,
    )
    os.close(write)
    return process, read


def _ready(url: str, process: subprocess.Popen[bytes]) -> None:
    """Liveness answers (its output is the pipe, not a file: nothing to show if not)."""
    Process(process, url, Path(os.devnull)).wait_ready(timeout=30)


@pytest.mark.process
def test_a_service_whose_stdout_stalls_goes_on_serving_and_reports_what_it_dropped() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, read = _service_on_a_pipe(port, LOG_MAX_HELD_BYTES="262144", SERVICE_NAME="hello")
    try:
        _ready(url, process)
        with httpx.Client(base_url=url, timeout=5) as client:
            # Each request writes an access line: far more than the pipe and the bound
            # hold. Before, the service stopped answering once the pipe was full.
            for n in range(1500):
                assert client.get(f"/hello/{n}").status_code == 200
            assert client.get("/health/liveness").status_code == 200
            assert client.get("/health/readiness").status_code == 200
            metrics = client.get("/metrics").text
        dropped = next(
            line for line in metrics.splitlines() if line.startswith("kiban_log_output_dropped")
        )
        assert float(dropped.split()[-1]) > 0
        # The output takes lines again: the count of the dropped ones is written.
        received = _drain(read, b"log lines dropped")
        report = next(
            orjson.loads(raw) for raw in received.splitlines() if b"log lines dropped" in raw
        )
        assert report["dropped"] > 0
        assert report["service"] == "hello"
    finally:
        process.terminate()
        process.wait(10)
        os.close(read)


@pytest.mark.process
def test_a_service_whose_stdout_stalls_still_exits_promptly_on_sigterm() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, read = _service_on_a_pipe(port, LOG_MAX_HELD_BYTES="262144")
    try:
        _ready(url, process)
        with httpx.Client(base_url=url, timeout=5) as client:
            for n in range(1000):
                client.get(f"/hello/{n}")
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - began < log.Sink.EXIT_SECONDS + 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(read)
