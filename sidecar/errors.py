"""Errors the sidecar maps to HTTP answers (``DESIGN.md``: The HTTP contract), and which are retried.

Each carries the status code and a message for the JSON body ``{"statusCode", "message"}``.
``is_transient`` is an allow-list (``DESIGN.md``: The sidecar's lifecycle, Errors): a task retries only
what is known to be passing, and never a wait that already used the whole bound a user set.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from sidecar.paths import shown
from sidecar.redaction import mask_fields


class SettingsError(ValueError):
    """A setting cannot work: raised by a provider's ``Config.check`` and by ``sidecar.bounds.check_bounds``
    (any numeric setting out of its range, the sidecar's own included). The message is one line naming
    the flag, never a secret's value; the command line prints it and exits with code 2."""


class SidecarError(Exception):
    """Base class: ``status_code`` is the HTTP status the API answers with; ``message`` goes into the
    JSON body and the log as it is, so it is made readable here, once for every error
    (:func:`sidecar.paths.shown`: a name holding U+202E, U+E000 or a control character is shown
    escaped, ``\\u202e``, never raw)."""

    status_code = 500

    def __init__(self, message: str):
        # A service's text quoted in a message may carry a key: masked here, before it reaches the
        # answer, a log line, a flow run's state or the run history.
        message = mask_fields(shown(message))
        super().__init__(message)
        self.message = message


def spelt_out(problems: list[tuple[str, str]], limit: int) -> list[str]:
    """``"name: problem"`` for the first ``limit`` of ``problems`` (``(name, problem)`` pairs), then
    ``"and N more"`` when there are more: the one way a message lists many problems."""
    named = [f"{name}: {problem}" for name, problem in problems[:limit]]
    if len(problems) > limit:
        named.append(f"and {len(problems) - limit} more")
    return named


class InputError(SidecarError):
    """A module's output breaks the folder contract; names the file (and key). HTTP 400.

    Raised before anything is committed, so the module can fix its files and call ``/done`` again.
    """

    status_code = 400

    # At most this many (file, problem) pairs are spelt out in one message (see :meth:`listing`).
    MAX_NAMED = 20

    def __init__(self, file: str, problem: str, key: str | None = None):
        where = f"{file}: key '{key}'" if key else file
        super().__init__(f"{where}: {problem}")
        self.file = shown(file)
        self.key = shown(key) if key is not None else None
        self.files = [self.file]

    @classmethod
    def listing(cls, problems: list[tuple[str, str]], advice: str = "") -> "InputError":
        """One error naming every ``(file, problem)`` pair (in the given order; past :data:`MAX_NAMED`
        the rest are counted), then ``advice``: so a module fixes all of them before its next ``/done``.
        ``file`` is the first file; ``files`` lists them all."""
        (file, problem), *rest = problems
        named = [problem] + spelt_out(rest, cls.MAX_NAMED - 1)
        error = cls(file, "; ".join(named) + (f". {advice}" if advice else ""))
        error.files = [shown(f) for f, _ in problems]
        return error


class OutputChanged(InputError):
    """An output file under ``out/data`` changed (size or modification time), vanished or became
    unreadable between ``/done``'s plan and the end of its upload: the module changed its outputs
    after calling ``/done``. HTTP 409. Raised before any insight, event meta or event is stored, so
    the module can restore its outputs and call ``/done`` again (README, The folder contract)."""

    status_code = 409


class StateError(SidecarError):
    """A call out of order (``/done`` before ``/ready``, ``/ready`` after ``/done``). HTTP 409."""

    status_code = 409


class Stopping(SidecarError):
    """The sidecar received SIGTERM while the call ran; the run's state is kept on the volume, so the
    same call to the restarted sidecar resumes it. HTTP 503 (retry)."""

    status_code = 503


class DataPlaneUnavailable(SidecarError):
    """A data-plane service could not be reached in time; retrying later may work. HTTP 503.

    ``store`` names the service: ``"blob store"``, ``"document store"`` or ``"event bus"``.
    """

    status_code = 503

    def __init__(self, store: str, detail: str):
        super().__init__(f"{store} unavailable: {detail}")
        self.store = store


class DataPlaneTimeout(DataPlaneUnavailable):
    """A data-plane service did not answer within the bound the user set. HTTP 503, and not retried
    by the task: a retry would multiply the user's bound (the module's own retry of the call may)."""


class DataPlaneError(SidecarError):
    """A data-plane service refused the request for good (authentication, missing container,
    verification mismatch after retries). Not retried by the task. HTTP 502."""

    status_code = 502

    def __init__(self, store: str, detail: str):
        super().__init__(f"{store} error: {detail}")
        self.store = store


class VolumeError(SidecarError):
    """The module's own volume failed (disk full, permission denied, read-only): not a data-plane
    service. The message names the path as the module sees it. HTTP 507 when the volume is full
    (ENOSPC, EDQUOT), else 500. Not retried by the task: no wait makes room or grants a permission."""

    def __init__(self, path: str, exc: OSError):
        reason = exc.strerror or type(exc).__name__
        super().__init__(f"module volume: {path}: {reason} (errno {exc.errno})")
        self.path = path
        self.errno = exc.errno
        self.status_code = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500


def volume_error(exc: BaseException, basedir: Path) -> VolumeError | None:
    """The :class:`VolumeError` for ``exc`` when it is an ``OSError`` about a path under ``basedir``
    (the module's volume), else None. The path is shown relative to ``basedir``."""
    if not isinstance(exc, OSError) or isinstance(exc, SidecarError):
        return None
    root = os.path.abspath(basedir)
    for name in (exc.filename, exc.filename2):
        if not isinstance(name, (str, os.PathLike)):
            continue
        full = os.path.abspath(os.fspath(name))
        if full == root or full.startswith(root + os.sep):
            return VolumeError(os.path.relpath(full, root), exc)
    return None


# Errors of services known to pass: connection refused/reset/aborted, a broken pipe, and a process
# short of descriptors or memory for a socket (EMFILE/ENFILE/ENOBUFS/ENOMEM, load that comes and goes).
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN}


def timed_out(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a timeout: a wait that used its
    whole bound. Recognised by the standard ``TimeoutError`` and by class names ending in ``Timeout``
    or ``TimeoutError`` (pymongo ``NetworkTimeout``/``ServerSelectionTimeoutError``, azure-core
    ``ServiceResponseTimeoutError``), so no provider library is imported here."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (DataPlaneTimeout, TimeoutError, asyncio.TimeoutError)):
            return True
        name = type(exc).__name__
        if name.endswith("Timeout") or name.endswith("TimeoutError"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1  # what it was raised from, or during
    return False


def is_transient(exc: BaseException) -> bool:
    """True when a task should retry ``exc``: an allow-list.

    Retried: :class:`DataPlaneUnavailable` (a provider's verdict: refused, reset, busy, throttled,
    verification mismatch) and bare connection errors, unless the error is a timeout (:func:`timed_out`).
    Everything else is not retried: input, state, volume and permanent errors, and programming errors
    (``KeyError``, ``TypeError``, ...), which no retry can fix.
    """
    if timed_out(exc):
        return False
    if isinstance(exc, DataPlaneUnavailable):
        return True
    if isinstance(exc, SidecarError):
        return False
    if isinstance(exc, ConnectionError):
        return True
    # An OSError naming a file is about a local file (the volume), not about a connection.
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS and exc.filename is None
