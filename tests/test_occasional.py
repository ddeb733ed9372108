"""A warning that can repeat on every request is written at most once an interval."""

from __future__ import annotations

from kiban._occasional import Occasional
from tests.conftest import Lines


def test_the_first_line_at_once_then_one_an_interval_with_the_count_since(lines: Lines) -> None:
    now = [100.0]
    down = Occasional("dependency down", interval=1.0, clock=lambda: now[0])
    for tick in range(25):  # 25 occurrences over 2.4 s
        now[0] = 100.0 + tick / 10
        down.warning(dependency="redis")
    written = [line for line in lines.app() if line["msg"] == "dependency down"]
    assert [line["occurrences"] for line in written] == [1, 10, 10]
    assert {line["dependency"] for line in written} == {"redis"}
    assert {line["level"] for line in written} == {"warning"}
