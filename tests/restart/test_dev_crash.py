"""A development-mode sidecar (``--development=true``, local providers under ``.dev``) SIGKILLed at each
step of /done and started again on the same volume: the events under ``.dev/events`` and the blobs under
``.dev`` are each there exactly once. Real processes; the crash points of ``sidecar/crashpoints.py``.
``tests/restart/test_crash.py`` covers the real providers; this covers the development ones."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ion_sidecar_client import SidecarClient
from testsupport.restart import dev_run_pausing_at

FILES, EVENTS = 6, 3


def dev_files(dev: Path, sub: str) -> list[Path]:
    return sorted(p for p in (dev / sub).rglob("*") if p.is_file()) if (dev / sub).exists() else []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("step", ["uploaded-file#2", "uploaded", "metas", "accepted", "published"])
def test_sigkill_during_dev_done_then_restart_commits_each_output_once(tmp_path: Path, sidecars: list, step: str) -> None:
    sidecar, client = dev_run_pausing_at(tmp_path, sidecars, step, "ev-devcrash", "corr-devcrash", files=FILES,
                                         events=EVENTS, content=lambda i: f"{i}".encode() * 1000,
                                         insight={"files": str(FILES)}, flags=("--transfer.concurrency=1",))
    answers: dict = {}
    t = threading.Thread(target=lambda: answers.setdefault("done", _try(client)), daemon=True)
    t.start()
    sidecar.wait_paused()
    sidecar.kill()  # the fault really happened: the process was frozen at the step, and is gone
    assert sidecar.proc.returncode == -9
    t.join(60)
    sidecar.start()
    sidecar.wait_healthy()
    done = client.done(retry_seconds=120)
    assert len(done["events"]) == EVENTS, done
    dev = tmp_path / ".dev"
    events = dev_files(dev, "events")
    ids = [json.loads(p.read_text()).get("id") or p.name for p in events]
    assert len(events) == EVENTS and len(set(ids)) == EVENTS, [str(p) for p in events]
    blob_files = [p for p in dev_files(dev, "blobs") if "ev-devcrash" in str(p)]
    assert len(blob_files) == FILES, [str(p) for p in blob_files]
    sidecar.stop()


def _try(client: SidecarClient) -> object:
    try:
        return client.done(retry_seconds=0)
    except Exception as exc:  # the killed call: a transport error is expected
        return exc
