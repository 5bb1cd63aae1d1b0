"""The development server hangs (SIGSTOP): the sidecar answers 503 "Prefect API unavailable" within a
bounded time and says so in /healthz, the supervisor kills the hung server and starts it again, and the
sidecar recovers without a restart. Real processes; the supervisor's hang window is shortened to 6 s
(``SIDECAR_DEVSERVER_HUNG_SECONDS``; 30 s by default)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil

from testsupport.outages import assert_unavailable, wait_health
from testsupport.processes import SidecarProcess, dev_args


def test_a_hung_development_server_is_restarted(tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "home"), "SIDECAR_DEVSERVER_HUNG_SECONDS": "6"}
    state_dir = tmp_path / ".dev" / "prefect"
    sidecar = SidecarProcess(tmp_path, [*dev_args("evt-hung", "corr-hung", "mod"), "--prefectstartuptimeoutseconds=2"],
                             env=env)
    server = None
    try:
        sidecar.wait_healthy(timeout=240)
        deadline = time.monotonic() + 30  # the supervisor, too, has seen its server answer
        while "answers on port" not in (state_dir / "supervisor.log").read_text():
            assert time.monotonic() < deadline, (state_dir / "supervisor.log").read_text()
            time.sleep(0.2)
        server = psutil.Process(int((state_dir / "server.pid").read_text()))
        server.suspend()  # SIGSTOP: the kernel still accepts its connections; nothing answers
        deadline = time.monotonic() + 10  # a signal is delivered asynchronously
        while server.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, "the Prefect server did not stop on SIGSTOP"
            time.sleep(0.05)
        started = time.monotonic()
        response = sidecar.get("/ready", timeout=300)
        seconds = time.monotonic() - started
        print(f"/ready against the hung development server: {response.status_code} in {seconds:.1f} s")
        assert_unavailable(response)
        assert seconds < 45, f"/ready took {seconds:.1f} s against a hung development server"
        assert "unreachable" in wait_health(sidecar, 503, 15).json()["message"]
        # The supervisor kills the hung server and starts another on the same port.
        wait_health(sidecar, 200, 180)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, "the hung server was kept"
        assert int((state_dir / "server.pid").read_text()) != server.pid
        assert "has not answered" in (state_dir / "supervisor.log").read_text()
        response = sidecar.get("/ready")
        assert response.status_code == 200, response.text
    finally:
        if server is not None and server.is_running():
            server.send_signal(signal.SIGCONT)
        sidecar.stop()
