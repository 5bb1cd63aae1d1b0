"""Services the tests start die with the process that started them: a SIGKILLed pytest (or bench)
leaves no Prefect server, PostgreSQL cluster, Azurite, nx-27017 or sidecar behind
(``testsupport.processes.dies_with_parent``: Linux ``PR_SET_PDEATHSIG``).

A parent process starts each service with the tests' own starters and waits; the test SIGKILLs it,
as the kernel's OOM killer or a CI timeout would kill pytest, and checks that every process of the
tree is gone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from testsupport.processes import ROOT, dies_with_parent, python_env

pytestmark = pytest.mark.timeout(600)

PARENT = """
import json, sys, time
from pathlib import Path
from testsupport.azurite import run_azurite
from testsupport.mongo import NxServer
from testsupport.processes import Postgres, SidecarProcess, dev_args, start_prefect_server

root = Path(sys.argv[1])
postgres = Postgres(root / "pg")
(root / "home").mkdir()
server, url = start_prefect_server(root / "home", database_url=postgres.url)
azurite_running = run_azurite()  # kept: a collected generator would stop Azurite
azurite = azurite_running.__enter__()
(root / "nx").mkdir()
mongo = NxServer(root / "nx")
mongo.start()
(root / "work").mkdir()
sidecar = SidecarProcess(root / "work", dev_args("evt-orphan", "corr-orphan", "mod"), env={"PREFECT_API_URL": url})
sidecar.wait_healthy(300)
print(json.dumps({"postgres": postgres.proc.pid, "prefect": server.pid, "azurite": azurite.proc.pid,
                  "mongo": mongo.proc.pid, "sidecar": sidecar.proc.pid}), flush=True)
time.sleep(3600)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_services_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT, env=python_env(),
                              stdout=subprocess.PIPE, stderr=(tmp_path / "parent.log").open("wb"), text=True,
                              preexec_fn=dies_with_parent())
    try:
        line = parent.stdout.readline()
        assert line, f"the parent did not start its services:\n{(tmp_path / 'parent.log').read_text()}"
        services = json.loads(line)
        # The whole tree: the services and whatever they started (PostgreSQL's backends and workers).
        tree = {p.pid: " ".join(p.cmdline()[:3]) for p in psutil.Process(parent.pid).children(recursive=True)}
        assert set(services.values()) <= set(tree), (services, tree)
        assert len(tree) > len(services), "PostgreSQL's own processes are missing from the tree"

        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.2)
        left = {pid: cmd for pid, cmd in tree.items() if alive(pid)}
        assert not left, f"orphaned after the parent's SIGKILL: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in locals().get("tree", {}):
            if alive(pid):
                psutil.Process(pid).kill()
