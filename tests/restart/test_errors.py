"""The error model (``DESIGN.md``: The sidecar's lifecycle, Errors): only errors known to be transient
are retried, a timeout is not retried, and the module's own volume is named as such, never as a
data-plane service."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from sidecar.errors import (DataPlaneError, DataPlaneTimeout, DataPlaneUnavailable, InputError, StateError,
                            VolumeError, is_transient)
from sidecar.models import BlobFile, EventMeta
from testsupport.runtime import H, dev_runtime, write_found_outputs


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as exc:  # noqa: BLE001
        return exc


class ServiceResponseTimeoutError(Exception):
    """Named as azure-core's: recognised by name, no provider library imported."""


@pytest.mark.parametrize("error, retried", [
    (DataPlaneUnavailable("blob store", "connection refused"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (raised_from(DataPlaneUnavailable("blob store", "read"), ServiceResponseTimeoutError("socket")), False),
    (raised_from(DataPlaneUnavailable("document store", "x"), TimeoutError()), False),
    (DataPlaneTimeout("event bus", "deadline"), False),
    (DataPlaneError("blob store", "403"), False),
    (InputError("out/events/a.json", "bad"), False),
    (StateError("409"), False),
    (VolumeError("in/data/x", OSError(errno.ENOSPC, "No space left on device")), False),
    (OSError(errno.ENOSPC, "No space left on device", "/ion/in/data/x"), False),
    (KeyError("x"), False), (TypeError("x"), False), (ValueError("x"), False), (RuntimeError("x"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_is_transient_is_an_allow_list(error: BaseException, retried: bool) -> None:
    assert is_transient(error) is retried


def test_a_programming_error_is_not_retried(tmp_path: Path) -> None:
    runtime = dev_runtime(tmp_path, "--transfer.retries=3", "--transfer.retrydelayseconds=0.05")
    calls = []

    def broken(metas):
        calls.append(len(metas))
        raise KeyError("eventId")

    runtime.dataplane.documents.upsert_event_metas = broken
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(runtime, 1)
        answer = client.get("/done", headers=H)
    assert answer.status_code == 500 and "KeyError" in answer.json()["message"]
    assert calls == [1]  # one attempt: retrying a bug only delays its report


def test_a_full_volume_on_ready_is_507_naming_the_path_not_the_blob_store(tmp_path: Path) -> None:
    runtime = dev_runtime(tmp_path, "--transfer.retries=3")
    blobs = runtime.dataplane.blobs
    source = tmp_path / "src.bin"
    source.write_bytes(b"a" * 100)
    asyncio.run(blobs.upload(source, "parent/mod/a.bin"))
    asyncio.run(runtime.dataplane.documents.upsert_event_metas([EventMeta(
        id="evt-api", eventId="evt-api", correlationId="corr-api", parentEventId="parent", eventType="found",
        producer="parent", files=[BlobFile(path="sub/a.bin", key="parent/mod/a.bin", size=100)])]))
    attempts = []

    async def full_disk(key: str, local: Path, size_hint: int | None = None):
        attempts.append(key)  # what open(local, "wb") and write() say on a full volume
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(local))

    blobs._get = full_disk
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        answer = client.get("/ready", headers=H)
    body = answer.json()
    assert answer.status_code == 507, body
    assert "module volume: in/data/sub/a.bin (downloading in in/.staging)" in body["message"]
    assert "blob store" not in body["message"]
    assert attempts == ["parent/mod/a.bin"]  # not retried


def test_an_unreadable_output_on_done_names_the_file_not_the_blob_store(tmp_path: Path) -> None:
    runtime = dev_runtime(tmp_path, "--transfer.retries=3")
    blobs = runtime.dataplane.blobs

    async def denied(local: Path, key: str):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(local))

    blobs._put = denied
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(runtime, 1)
        answer = client.get("/done", headers=H)
    body = answer.json()
    assert answer.status_code == 500 and "module volume" in body["message"], body
    assert "out/data/f0.txt" in body["message"] and "blob store" not in body["message"]


def test_a_file_where_a_folder_should_be_is_named(tmp_path: Path) -> None:
    """Real errors of the volume, not injected ones: ``in`` a file breaks the folder contract (400
    naming it, as /done names ``out``; README: The folder contract), a file where the run record's
    folder should be is the volume's (500 naming it)."""
    runtime = dev_runtime(tmp_path)
    base = runtime.layout.basedir
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        (base / "in").rename(base / "in-moved")
        (base / "in").write_text("not a folder")
        answer = client.get("/ready", headers=H)
    body = answer.json()
    assert answer.status_code == 400 and body["message"].startswith("in: is not a folder"), body
    (base / "in").unlink()
    shutil.rmtree(base / ".sidecar")
    (base / ".sidecar").write_text("not a folder")
    with TestClient(create_app(dev_runtime(tmp_path)), raise_server_exceptions=False) as client:
        answer = client.get("/ready", headers=H)
    body = answer.json()
    assert answer.status_code == 500 and "module volume: .sidecar/run.json" in body["message"], body
