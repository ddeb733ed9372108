"""Context logging: JSON lines carrying the request context, a runtime level, a TTY mode."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban import _log as log
from kiban._config import Settings
from kiban._log import configure, set_level
from kiban.security import NoSecurity
from tests.conftest import Lines


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
