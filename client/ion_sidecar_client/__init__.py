"""The module authors' client of the Ion sidecar: call ``/ready`` and ``/done``, write the folder contract.

``spec/SIDECAR.md``: a module calls ``GET /ready`` in a retry loop (process start order is not
guaranteed), works on ``in/``, writes ``out/``, then calls ``GET /done``; every request carries header
``secret`` with the value of ``SHARED_SECRET``. Defaults come from the environment: ``SHARED_SECRET``,
``SIDECAR_HOST`` (127.0.0.1), ``SIDECAR_PORT`` (8080), ``SIDECAR_BASEDIR`` (``/ion``) and
``SIDECAR_RETRY_SECONDS`` (300).

Retry policy (one for both calls, bounded by a total time rather than a count, so that a module rides
out a sidecar that starts after it, a Prefect server restart behind a sidecar, or a restarted sidecar):

- connection errors (nothing listens yet, the connection dropped) and 5xx answers (503: the sidecar or
  its Prefect API is starting or briefly down) are retried with exponential back-off until
  ``retry_seconds`` have passed since the first attempt; the last error is raised then;
- 4xx answers raise at once (wrong secret, bad outputs: retrying cannot help), except a 409 on
  ``/done``, retried ``conflict_retries`` times: a sidecar restarted between ``/ready`` and ``/done``
  may answer 409 until it has resumed the run from its volume, and a repeated ``/done`` never commits
  twice (``DESIGN.md``: The HTTP contract); but not the 409 naming outputs written after the run
  committed (:data:`COMMITTED_ALREADY`): a run commits once, so no retry can commit them.

Depends on the standard library and httpx only, so a module's image stays small.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import httpx

__all__ = ["SidecarClient", "SidecarCallError", "Layout", "DEFAULT_RETRY_SECONDS", "secret_problem"]

# Long enough for a Prefect server restart behind the sidecar (its API answers again within a minute
# or two) or a sidecar container restarted by Kubernetes with back-off.
DEFAULT_RETRY_SECONDS = 300.0


@dataclass(frozen=True)
class Layout:
    """The folder contract below ``basedir`` (``DESIGN.md``: Folder contract)."""

    basedir: Path

    @property
    def in_data(self) -> Path:
        return self.basedir / "in" / "data"

    @property
    def in_meta(self) -> Path:
        return self.basedir / "in" / "meta.json"

    @property
    def out_data(self) -> Path:
        return self.basedir / "out" / "data"

    @property
    def out_meta(self) -> Path:
        return self.basedir / "out" / "meta.json"

    @property
    def out_events(self) -> Path:
        return self.basedir / "out" / "events"


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot travel in the ``secret`` header unchanged (a phrase that never quotes it),
    or None. The sidecar applies this function at start-up (``sidecar/sharedsecret.py``): HTTP strips
    blanks at either end of a header value and forbids control characters, and the value travels as
    the secret's UTF-8 bytes."""
    if not secret:
        return "is empty"
    if secret != secret.strip(" \t"):
        return "starts or ends with a blank, which HTTP strips from header values"
    for ch in secret:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"holds control character U+{code:04X}, which an HTTP header cannot carry"
        if 0xD800 <= code <= 0xDFFF:
            return "is not valid UTF-8"
    return None


# How a repeated /done's 409 begins when outputs were written after the run committed (sidecar/api.py):
# not retried, since the run commits once and a retry answers the same.
COMMITTED_ALREADY = "/done already committed this run's outputs"


class SidecarCallError(Exception):
    """The sidecar answered ``GET path`` with a status other than 200.

    Attributes:
        status_code: the HTTP status.
        body: the answer's body (the sidecar's JSON ``{"statusCode", "message"}``).
    """

    def __init__(self, path: str, status_code: int, body: str):
        super().__init__(f"GET {path} -> {status_code}: {body}")
        self.status_code = status_code
        self.body = body


class SidecarClient:
    """Talks to the sidecar beside this module and writes the module's outputs.

    Args:
        url: the sidecar's base URL; default ``http://{SIDECAR_HOST}:{SIDECAR_PORT}``.
        secret: the shared secret; default ``SHARED_SECRET`` from the environment. Sent as its UTF-8
            bytes, so any Unicode secret works.
        basedir: the shared volume; default ``SIDECAR_BASEDIR`` or ``/ion``.
        retry_seconds: total time, seconds, during which connection errors and 5xx answers are retried
            (from the first attempt of a call); default ``SIDECAR_RETRY_SECONDS`` or 300.
        first_delay: the first back-off, seconds; doubled after each retry up to ``max_delay``.
        max_delay: the longest back-off, seconds.
        conflict_retries: how many times a 409 answer to ``/done`` is retried.

    Raises:
        ValueError: no ``secret`` given and ``SHARED_SECRET`` unset or empty; a secret HTTP cannot carry
            (:func:`secret_problem`); a retry setting that is not a non-negative number.
    """

    def __init__(self, url: str | None = None, secret: str | None = None, basedir: str | Path | None = None,
                 *, retry_seconds: float | None = None, first_delay: float = 0.5, max_delay: float = 10.0,
                 conflict_retries: int = 3):
        host = os.environ.get("SIDECAR_HOST", "127.0.0.1")
        port = os.environ.get("SIDECAR_PORT", "8080")
        self.url = (url or f"http://{host}:{port}").rstrip("/")
        if secret is None:
            secret = os.environ.get("SHARED_SECRET")
            if not secret:
                raise ValueError("no shared secret: set SHARED_SECRET in the module's environment (or pass secret=)")
        problem = secret_problem(secret)
        if problem:
            raise ValueError(f"the shared secret {problem} (see the sidecar README's secret rule)")
        self.secret = secret
        self.layout = Layout(Path(basedir or os.environ.get("SIDECAR_BASEDIR", "/ion")))
        if retry_seconds is None:
            raw = os.environ.get("SIDECAR_RETRY_SECONDS", str(DEFAULT_RETRY_SECONDS))
            try:
                retry_seconds = float(raw)
            except ValueError:
                raise ValueError(f"SIDECAR_RETRY_SECONDS must be a number of seconds, not {raw!r}") from None
        if retry_seconds < 0 or first_delay < 0 or max_delay < 0 or conflict_retries < 0:
            raise ValueError("retry_seconds, first_delay, max_delay and conflict_retries must not be negative")
        self.retry_seconds = retry_seconds
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.conflict_retries = conflict_retries

    def _get(self, path: str, timeout: float) -> dict:
        """One ``GET path``; returns the JSON body of a 200.

        Raises:
            SidecarCallError: any other status.
            httpx.TransportError: no answer (refused, reset, timed out).
        """
        headers = {"secret": self.secret.encode("utf-8")}
        response = httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout)
        if response.status_code != 200:
            raise SidecarCallError(path, response.status_code, response.text)
        return response.json()

    def _retry(self, path: str, timeout: float, retry_seconds: float | None) -> dict:
        total = self.retry_seconds if retry_seconds is None else retry_seconds
        deadline = time.monotonic() + total
        delay = self.first_delay
        conflicts = 0
        while True:
            try:
                return self._get(path, timeout)
            except httpx.TransportError as exc:
                last: Exception = exc
            except SidecarCallError as exc:
                if exc.status_code == 409 and path == "/done" and conflicts < self.conflict_retries \
                        and COMMITTED_ALREADY not in exc.body:
                    conflicts += 1
                elif exc.status_code < 500:
                    raise
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise last
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self.max_delay)

    def ready(self, timeout: float = 600.0, retry_seconds: float | None = None) -> dict:
        """``GET /ready``: stages ``in/data`` and ``in/meta.json``. Retried as the module docstring says.

        Args:
            timeout: seconds one request may take (staging large inputs takes a while).
            retry_seconds: overrides the client's total retry time for this call, seconds.

        Returns:
            The summary ``{"flowRunId", "files", "bytes", "seconds"}``.

        Raises:
            SidecarCallError: a 4xx answer (wrong secret, ``/ready`` after ``/done``), or the last 5xx.
            httpx.TransportError: the sidecar never answered within the retry time.
        """
        return self._retry("/ready", timeout, retry_seconds)

    def done(self, timeout: float = 600.0, retry_seconds: float | None = None) -> dict:
        """``GET /done``: commits ``out/``. A retried ``/done`` never duplicates a blob, document or event.

        Args and errors as :meth:`ready`; a 4xx names the bad output file and key.

        Returns:
            ``{"flowRunId", "files", "bytes", "seconds", "events": [{"eventId", "eventType"}]}``.
        """
        return self._retry("/done", timeout, retry_seconds)

    def input_meta(self) -> dict[str, str]:
        """``in/meta.json`` as a dict (the parent event's passed-on pairs)."""
        pairs = json.loads(self.layout.in_meta.read_text(encoding="utf-8"))
        return {p["key"]: p["value"] for p in pairs}

    def input_files(self) -> list[str]:
        """The files staged into ``in/data``, as sorted paths relative to it (``/`` separated), the names
        the parent listed in its event; open one with :meth:`input_path` (``client.input_path(p)``)."""
        root = self.layout.in_data
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def input_path(self, path: str) -> Path:
        """The local path of the input ``path`` (as :meth:`input_files` names it, relative to ``in/data``).

        Raises:
            ValueError: ``path`` is absolute or leads outside ``in/data`` (``..``).
        """
        relative = Path(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{path!r}: an input is named relative to in/data, as input_files() names it")
        return self.layout.in_data / relative

    def write_file(self, path: str, data: bytes) -> Path:
        """Write ``data`` to ``out/data/{path}`` (subfolders created); returns the local path."""
        target = self.layout.out_data / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def write_event(self, name: str, event_type: str, files: Iterable[str] = (), **data: str) -> Path:
        """Write ``out/events/{name}.json``: ``eventType``, ``files`` (paths relative to ``out/data``,
        joined with commas) and the extra pairs ``data`` (strings), which pass on to the child's
        ``in/meta.json``. Returns the event file's path."""
        pairs = [{"key": "eventType", "value": event_type}]
        files = list(files)
        if files:
            pairs.append({"key": "files", "value": ",".join(files)})
        pairs += [{"key": k, "value": v} for k, v in data.items()]
        target = self.layout.out_events / f"{name}.json"
        _write_json_atomic(target, pairs)
        return target

    def write_insight(self, **data: str) -> Path:
        """Write ``out/meta.json``: insights (strings) stored for analysis, not passed on."""
        _write_json_atomic(self.layout.out_meta, [{"key": k, "value": v} for k, v in data.items()])
        return self.layout.out_meta


def _write_json_atomic(path: Path, value: object) -> None:
    # A temp file and a rename: the sidecar never reads half an event file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
