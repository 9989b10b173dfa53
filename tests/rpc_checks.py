"""Checks several test modules make of a server's answers and of a process's memory."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest


def assert_refused(call: Callable[[], object], code: grpc.StatusCode, text: str) -> None:
    """`call` fails with status `code`, and its details contain `text`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert text in error.details(), error.details()


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")
