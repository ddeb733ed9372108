"""No credential the suite used appears in any log the suite produced."""

from __future__ import annotations

import pytest

from kiban import _log as log
from tests.conftest import LOGS, SECRETS


@pytest.mark.last
def test_no_secret_reached_any_log() -> None:
    log.sink.flush()
    leaks = []
    for path in LOGS:
        if not path.exists():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        for value in SECRETS:
            if value in text:
                leaks.append(f"{path.name}: {value[:12]}...")
            elif (
                value.count(".") == 2
                and len(value.split(".")[1]) >= 16
                and (value.split(".")[1] in text)
            ):
                leaks.append(f"{path.name}: payload of {value[:12]}...")
    assert leaks == []
    assert len(SECRETS) > 12 or len(LOGS) < 2  # the scan saw the suite's credentials
