"""What many tests share: polling until something happens (`wait_for`), and a test whose tool
is missing (`tool_missing`): skipped on a developer's machine, failed under CI.

`make test` installs every tool the suite needs, so under CI (`CI` set) a missing one means the
setup is broken, and a green run must always mean every test ran.
"""

import os
import time

import pytest


def tool_missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI is set, so a missing tool fails instead of skipping")
    pytest.skip(why)


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `check` until it returns something true (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
