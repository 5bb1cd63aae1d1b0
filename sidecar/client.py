"""A small client for module authors: call the sidecar and write outputs in the folder contract.

``spec/SIDECAR.md``: a module calls ``GET /ready`` in a retry loop (process start order is not
guaranteed), works on ``in/``, writes ``out/``, then calls ``GET /done``; every request carries header
``secret`` with the value of ``SHARED_SECRET``. Defaults come from the environment: ``SHARED_SECRET``,
``SIDECAR_PORT`` (8080), ``SIDECAR_HOST`` (127.0.0.1) and ``SIDECAR_BASEDIR`` (``/ion``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx

from sidecar.layout import ModuleLayout, write_json_atomic
from sidecar.models import KeyValuePair


class SidecarClient:
    """Talks to the sidecar beside this module and writes the module's outputs.

    Args:
        url: the sidecar's base URL; default ``http://{SIDECAR_HOST}:{SIDECAR_PORT}``.
        secret: the shared secret; default ``SHARED_SECRET`` from the environment.
        basedir: the shared volume; default ``SIDECAR_BASEDIR`` or ``/ion``.

    Raises:
        ValueError: no ``secret`` given and ``SHARED_SECRET`` unset or empty.
    """

    def __init__(self, url: str | None = None, secret: str | None = None, basedir: str | Path | None = None):
        host = os.environ.get("SIDECAR_HOST", "127.0.0.1")
        port = os.environ.get("SIDECAR_PORT", "8080")
        self.url = (url or f"http://{host}:{port}").rstrip("/")
        if secret is None:
            secret = os.environ.get("SHARED_SECRET")
            if not secret:
                raise ValueError("no shared secret: set SHARED_SECRET in the module's environment (or pass secret=)")
        self.secret = secret
        self.layout = ModuleLayout(Path(basedir or os.environ.get("SIDECAR_BASEDIR", "/ion")))

    def _get(self, path: str, timeout: float) -> dict:
        response = httpx.get(f"{self.url}{path}", headers={"secret": self.secret}, timeout=timeout)
        if response.status_code != 200:
            raise SidecarCallError(path, response.status_code, response.text)
        return response.json()

    def _retry(self, path: str, attempts: int, delay: float, timeout: float) -> dict:
        for attempt in range(1, attempts + 1):
            try:
                return self._get(path, timeout)
            except (httpx.TransportError, SidecarCallError) as exc:
                retryable = isinstance(exc, httpx.TransportError) or exc.status_code >= 500
                if not retryable or attempt == attempts:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def ready(self, attempts: int = 60, delay: float = 1.0, timeout: float = 600.0) -> dict:
        """``GET /ready`` until it succeeds: connection errors and 5xx are retried ``attempts`` times,
        ``delay`` seconds apart. Returns the summary ``{"flowRunId", "files", "bytes", "seconds"}``.

        Raises:
            SidecarCallError: a 4xx answer (wrong secret, call out of order), or 5xx on the last try.
            httpx.TransportError: the sidecar never answered.
        """
        return self._retry("/ready", attempts, delay, timeout)

    def done(self, attempts: int = 5, delay: float = 2.0, timeout: float = 600.0) -> dict:
        """``GET /done``, retrying 5xx answers (a retried ``/done`` never duplicates anything).
        Returns ``{"flowRunId", "files", "bytes", "seconds", "events"}``.

        Raises:
            SidecarCallError: a 4xx answer (bad outputs: the message names the file), or 5xx at last.
        """
        return self._retry("/done", attempts, delay, timeout)

    def input_meta(self) -> dict[str, str]:
        """``in/meta.json`` as a dict (the parent event's passed-on pairs)."""
        pairs = json.loads(self.layout.in_meta.read_text(encoding="utf-8"))
        return {p["key"]: p["value"] for p in pairs}

    def write_file(self, path: str, data: bytes) -> Path:
        """Write ``data`` to ``out/data/{path}`` (subfolders created); returns the local path."""
        target = self.layout.out_data / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def write_event(self, name: str, event_type: str, files: list[str] = (), **data: str) -> Path:
        """Write ``out/events/{name}.json``: ``eventType``, ``files`` (paths relative to ``out/data``)
        and the extra pairs ``data``, which pass on to the child's ``in/meta.json``."""
        pairs = [KeyValuePair(key="eventType", value=event_type)]
        if files:
            pairs.append(KeyValuePair(key="files", value=",".join(files)))
        pairs += [KeyValuePair(key=k, value=v) for k, v in data.items()]
        target = self.layout.out_events / f"{name}.json"
        write_json_atomic(target, [p.model_dump() for p in pairs])
        return target

    def write_insight(self, **data: str) -> Path:
        """Write ``out/meta.json``: insights stored for analysis, not passed on."""
        write_json_atomic(self.layout.out_meta, [{"key": k, "value": v} for k, v in data.items()])
        return self.layout.out_meta


class SidecarCallError(Exception):
    """The sidecar answered ``path`` with a status other than 200."""

    def __init__(self, path: str, status_code: int, body: str):
        super().__init__(f"GET {path} -> {status_code}: {body}")
        self.status_code = status_code
        self.body = body
