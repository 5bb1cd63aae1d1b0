"""A soak of back-to-back module runs with every real provider (Azurite, nx-27017, the AMQP peer):
no growth in open file descriptors, and every blob, document and message exactly once."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from testsupport.processes import SECRET
from testsupport.runtime import write_module_outputs
from testsupport.stack import Stack, stack_runtime

H = {"secret": SECRET}


@pytest.mark.timeout(3600)
def test_soak_back_to_back_runs_leak_nothing(tmp_path: Path, stack: Stack) -> None:
    # 100 runs take about 8 minutes here, over the suite's budget: CI runs 20, `SOAK_RUNS=100` the full soak.
    runs = int(os.environ.get("SOAK_RUNS", "20"))
    stack.received()
    process = psutil.Process()
    fds: list[int] = []
    children: list[str] = []
    for i in range(runs):
        parent = stack_runtime(stack, tmp_path, f"soak-{i}", "parent")
        with TestClient(create_app(parent)) as client:
            assert client.get("/ready", headers=H).status_code == 200
            write_module_outputs(parent.layout.basedir, 1, 4096, f"soak-{i}")
            done = client.get("/done", headers=H)
            assert done.status_code == 200, done.text
        [event] = done.json()["events"]
        child = stack_runtime(stack, tmp_path, event["eventId"], "child")
        with TestClient(create_app(child)) as client:
            staged = client.get("/ready", headers=H)
            assert staged.status_code == 200 and staged.json()["files"] == 1
            assert client.get("/done", headers=H).status_code == 200
        children.append(event["eventId"])
        fds.append(process.num_fds())
    delivered = collections.Counter(m.message_id for m in stack.received())
    assert sorted(delivered) == sorted(children) and set(delivered.values()) == {1}
    assert len(stack.blobs("soak-")) == runs
    soak_metas = [m for m in stack.documents() if m["parentEventId"].startswith("soak-")]
    assert len(soak_metas) == runs
    assert len([d for d in stack.documents("_insights") if d["eventId"].startswith("soak-")]) == runs
    settled = fds[min(9, runs - 1)]
    print(f"\nsoak: {runs} parent+child runs; open fds after run 10: {settled}, at the end: {fds[-1]}")
    assert fds[-1] - settled <= 8, f"open file descriptors grew: {fds}"
