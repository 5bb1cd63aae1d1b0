"""Without PREFECT_API_URL the sidecar starts a temporary Prefect server at start-up (not inside the
first /ready) and stops it when it exits, SIGTERM included: no orphaned server process."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil

from tests.support import SidecarProcess, dev_args


def test_temporary_prefect_server_is_started_early_and_stopped_on_sigterm(tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    sidecar = SidecarProcess(tmp_path, dev_args("evt-life", "corr-life", "mod"), env=env)
    try:
        sidecar.wait_healthy(timeout=120)
        children = psutil.Process(sidecar.proc.pid).children(recursive=True)
        assert children, "expected the temporary Prefect server as a child process"
        assert "temporary server at http://127.0.0.1:" in sidecar.output()
        ready = sidecar.get("/ready")
        assert ready.status_code == 200
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
        assert "stopped the temporary Prefect server" in sidecar.output()
        assert sidecar.output().count("Prefect API:") == 1
    finally:
        sidecar.stop()
