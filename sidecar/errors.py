"""Errors the sidecar maps to HTTP answers (``DESIGN.md``: The HTTP contract).

Each carries the status code and a message for the JSON body ``{"statusCode", "message"}``.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class: ``status_code`` is the HTTP status the API answers with."""

    status_code = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputError(SidecarError):
    """A module's output breaks the folder contract; names the file (and key). HTTP 400.

    Raised before anything is committed, so the module can fix its files and call ``/done`` again.
    """

    status_code = 400

    def __init__(self, file: str, problem: str, key: str | None = None):
        where = f"{file}: key '{key}'" if key else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.key = key


class StateError(SidecarError):
    """A call out of order (``/done`` before ``/ready``, ``/ready`` after ``/done``). HTTP 409."""

    status_code = 409


class DataPlaneUnavailable(SidecarError):
    """A data-plane service could not be reached in time; retrying later may work. HTTP 503.

    ``store`` names the service: ``"blob store"``, ``"document store"`` or ``"event bus"``.
    """

    status_code = 503

    def __init__(self, store: str, detail: str):
        super().__init__(f"{store} unavailable: {detail}")
        self.store = store


class DataPlaneError(SidecarError):
    """A data-plane service refused the request for good (authentication, missing container,
    verification mismatch after retries). Not retried by the task. HTTP 502."""

    status_code = 502

    def __init__(self, store: str, detail: str):
        super().__init__(f"{store} error: {detail}")
        self.store = store


def is_transient(exc: BaseException) -> bool:
    """True when a task should retry ``exc``: everything but input, state and permanent errors."""
    return not isinstance(exc, (InputError, StateError, DataPlaneError))
