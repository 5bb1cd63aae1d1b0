"""The error contract every provider keeps (``DESIGN.md``: the sidecar's lifecycle, Errors), as
assertions the conformance suites share:

- a service that cannot be reached is :class:`DataPlaneUnavailable`, HTTP 503: retried by the task when
  it failed fast, answered at once when the wait used its whole bound (the module's retry is the retry);
- credentials the service refuses are :class:`DataPlaneError`, HTTP 502, never retried;
- no message, traceback or log line carries a configured secret.
"""

from __future__ import annotations

import errno
import traceback
from typing import Any, Awaitable, Callable

from sidecar.dataplane import DataPlane
from sidecar.errors import DataPlaneError, DataPlaneUnavailable, is_transient, timed_out
from testsupport.providers import Subject, chain


async def failure_of(subject: Subject, flags: list[str], act: Callable[[DataPlane], Awaitable[Any]]) -> Exception:
    """What ``act`` raised on a data plane opened on ``flags`` (one of ``subject``'s flag sets, e.g.
    ``subject.unreachable``); the data plane is closed either way.

    Raises:
        AssertionError: ``act`` succeeded against a service that should have failed it.
    """
    dataplane = subject.dataplane(flags)
    try:
        await act(dataplane)
    except Exception as exc:  # noqa: BLE001 - the caller asserts what it is
        return exc
    finally:
        await dataplane.close()
    raise AssertionError("the call succeeded against a service that should have failed it")


def connection_refused(exc: BaseException) -> bool:
    """Whether a refused TCP connection is among the causes of ``exc`` (the fault really happened)."""
    for cause in chain(exc):
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return True
        if "Connection refused" in str(cause) or "Errno 111" in str(cause):
            return True
    return False


def assert_unavailable(exc: BaseException, store: str) -> None:
    """``exc`` is the "unreachable" verdict of ``store`` (e.g. ``"blob store"``): 503, retryable."""
    assert isinstance(exc, DataPlaneUnavailable), f"{type(exc).__name__}: {exc}"
    assert exc.status_code == 503 and exc.store == store
    assert is_transient(exc) or timed_out(exc), "retried by the task, or a wait that used its whole bound"
    assert connection_refused(exc), f"the fault did not happen as planned: {traceback.format_exception(exc)}"


def assert_refused(exc: BaseException, store: str) -> None:
    """``exc`` is the "credentials refused" verdict of ``store``: 502, not retried."""
    assert isinstance(exc, DataPlaneError), f"{type(exc).__name__}: {exc}"
    assert exc.status_code == 502 and exc.store == store and not is_transient(exc)


def assert_no_secret(subject: Subject, exc: BaseException, log: str) -> None:
    """No configured secret of ``subject`` in ``exc``'s message, its whole traceback (causes included:
    Prefect logs a failed task run's traceback) or ``log`` (every log line of the test, e.g. pytest's
    ``caplog.text`` at DEBUG)."""
    shown = {"message": str(exc), "traceback": "".join(traceback.format_exception(exc)), "log": log}
    for secret in subject.secrets:
        for where, text in shown.items():
            assert secret not in text, f"a secret ({len(secret)} characters) is in the {where}"
