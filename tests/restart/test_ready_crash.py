"""A sidecar SIGKILLed in the middle of /ready (one blob's download stalled by the blob store's fault proxy,
others already staged) and started again with the same flags on the same volume: the next /ready stages
every input completely, byte for byte, and leaves nothing else in ``in/``. Real processes and real peers:
the parent's outputs are committed to Azurite and nx-27017 by an in-process sidecar, the child is a
``python -m sidecar`` process (``testsupport.processes.RestartableSidecar``)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ion_sidecar_client import SidecarClient
from sidecar.api import create_app
from testsupport.processes import SECRET, RestartableSidecar
from testsupport.stack import Stack, seed_args, stack_runtime

H = {"secret": SECRET}
FILES, SIZE = 6, 256 * 1024


def content(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (SIZE // 32)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(300)
def test_sigkill_mid_ready_then_restart_stages_every_input_once_and_whole(tmp_path: Path, stack: Stack,
                                                                          sidecars: list) -> None:
    parent = stack_runtime(stack, tmp_path, "rk-parent", "parent")
    with TestClient(create_app(parent)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        out = parent.layout.basedir / "out"
        (out / "events").mkdir(parents=True, exist_ok=True)
        names = [f"in{i % 2}/f{i}.bin" for i in range(FILES)]
        for i, name in enumerate(names):
            (out / "data" / name).parent.mkdir(parents=True, exist_ok=True)
            (out / "data" / name).write_bytes(content(i))
        (out / "events" / "e.json").write_text(
            '[{"key": "eventType", "value": "file_discovered"}, {"key": "files", "value": "%s"}]' % ",".join(names))
        done = client.get("/done", headers=H)
        assert done.status_code == 200, done.text
    [child_event] = done.json()["events"]
    child_id = child_event["eventId"] if isinstance(child_event, dict) else child_event
    expected = {name: content(i) for i, name in enumerate(names)}

    args = seed_args(stack, child_id, "corr-rk-parent", "child", "rk-parent") + [
        "--transfer.concurrency=1", "--transfer.tasks=1", f"--devdir={tmp_path / '.dev'}"]
    sidecar = RestartableSidecar(tmp_path, args)
    sidecars.append(sidecar)
    sidecar.start()
    sidecar.wait_healthy()
    # The fourth input's download: its answer's head and 64 KiB go through, then nothing more.
    stack.blob_proxy.drip(when=rb"GET [^ ]*f3\.bin", after=64 * 1024, interval=None, past_head=True)
    module = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
    answers: dict[str, object] = {}

    def call() -> None:
        try:
            answers["ready"] = module.ready(retry_seconds=0)
        except Exception as exc:  # the killed call
            answers["ready"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while stack.blob_proxy.stalled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert stack.blob_proxy.stalled >= 1, "the download was never stalled"
        time.sleep(0.5)
        sidecar.kill()  # mid-/ready: the stalled download is in flight
        assert sidecar.proc.returncode == -9
        thread.join(30)
        assert "ready" not in answers or isinstance(answers["ready"], Exception), answers
        staged_before = files_under(sidecar.basedir / "in")
        assert any(k.startswith("data/") for k in staged_before) or any(k.startswith(".staging") for k in staged_before), \
            f"nothing was staged before the kill: {sorted(staged_before)}"
    finally:
        stack.blob_proxy.up()
        stack.up()

    sidecar.start()
    sidecar.wait_healthy()
    again = module.ready(retry_seconds=60)
    assert again["files"] == FILES, again
    assert files_under(sidecar.basedir / "in" / "data") == expected
    left = sorted(set(files_under(sidecar.basedir / "in")) - {f"data/{n}" for n in names} - {"meta.json"})
    assert left == [], left
    sidecar.stop()
