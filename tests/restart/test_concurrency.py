"""Structured concurrency: when one transfer of a flow fails for good, every sibling transfer (in its
own batch task run or another) is cancelled and has finished before the call is answered, so nothing
is written after the answer. In process, development providers, transfers slowed down on purpose."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import flows.runtime

from sidecar.api import create_app
from sidecar.errors import DataPlaneError
from sidecar.models import BlobFile, EventMeta
from testsupport.runtime import H, dev_runtime

FILES = 12
SLOW = 0.5  # seconds each transfer but the failing one takes


def files_under(root: Path) -> dict[str, float]:
    """Every file below ``root`` (partial downloads included) and its modification time."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_failed_upload_cancels_every_sibling_before_done_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows.runtime, "BATCH_LEAST_BYTES", 1)  # small files in 4 batch task runs, not one
    runtime = dev_runtime(tmp_path, "--transfer.tasks=4", "--transfer.concurrency=2")
    blobs = runtime.dataplane.blobs
    original = blobs.upload

    async def upload(local: Path, key: str):
        if local.name == "f0.bin":
            raise DataPlaneError("blob store", f"blob '{key}': refused (injected)")
        await asyncio.sleep(SLOW)
        return await original(local, key)

    blobs.upload = upload
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        for i in range(FILES):
            (runtime.layout.out_data / f"f{i}.bin").write_bytes(b"x" * 1000)
        failed = client.get("/done", headers=H)
        answered = time.time()
        assert failed.status_code == 502 and "f0.bin" in failed.json()["message"]
        root = tmp_path / ".dev" / "blobs"
        at_answer = files_under(root)
        time.sleep(SLOW * 4)  # what still ran would have written by now
        later = files_under(root)
    assert later == at_answer, f"blobs written after the answer: {sorted(set(later) - set(at_answer))}"
    assert all(mtime <= answered for mtime in later.values())
    assert len(at_answer) < FILES - 1  # siblings were cancelled, not waited for


def test_failed_download_cancels_every_sibling_before_ready_answers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows.runtime, "BATCH_LEAST_BYTES", 1)  # small files in 4 batch task runs, not one
    runtime = dev_runtime(tmp_path, "--transfer.tasks=4", "--transfer.concurrency=2")
    blobs = runtime.dataplane.blobs
    listed = []
    for i in range(FILES):
        key = f"parent/mod/f{i}.bin"
        if i:  # f0.bin is listed but missing from the blob store: a permanent error (502)
            local = tmp_path / f"src{i}"
            local.write_bytes(b"y" * 1000)
            asyncio.run(blobs.upload(local, key))
        listed.append(BlobFile(path=f"sub/f{i}.bin", key=key, size=1000))
    asyncio.run(runtime.dataplane.documents.upsert_event_metas([EventMeta(
        id="evt-api", eventId="evt-api", correlationId="corr-api", parentEventId="parent", eventType="found",
        producer="parent", files=listed)]))
    original = blobs._get

    async def slow_get(key: str, local: Path, size_hint: int | None = None):
        if not key.endswith("/f0.bin"):
            await asyncio.sleep(SLOW)
        return await original(key, local, size_hint)

    blobs._get = slow_get
    with TestClient(create_app(runtime)) as client:
        failed = client.get("/ready", headers=H)
        answered = time.time()
        assert failed.status_code == 502 and "does not exist" in failed.json()["message"]
        in_data = runtime.layout.in_data
        at_answer = files_under(in_data)
        time.sleep(SLOW * 4)
        later = files_under(in_data)
    assert later == at_answer, f"files created in in/data after the answer: {sorted(set(later) - set(at_answer))}"
    assert not [name for name in later if name.endswith(".partial")]  # cancelled downloads left nothing half-written
    assert all(mtime <= answered for mtime in later.values())
