"""The development server comes back on another port after warm-up started Prefect's log and event
workers (57620f4): its supervisor and server are killed (SIGKILL) before any call and the old port is
taken, so the sidecar starts a new supervisor whose server listens elsewhere (``_reattach_devserver``).
The flow runs that follow must still have their log lines in the run history. Real processes."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import psutil

from testsupport.outages import wait_health
from testsupport.processes import SidecarProcess, dev_args


def test_log_lines_reach_a_development_server_restarted_on_another_port(tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "home")}
    state_dir = tmp_path / ".dev" / "prefect"
    sidecar = SidecarProcess(tmp_path, [*dev_args("evt-port", "corr-port", "mod"), "--prefectstartuptimeoutseconds=2"],
                             env=env)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections' TIME_WAIT
    try:
        sidecar.wait_healthy(timeout=240)
        old = json.loads((state_dir / "server.json").read_text())
        server = psutil.Process(int(old["pid"]))
        tree = [*server.children(recursive=True), server]
        for process in tree:  # its supervisor starts another, on the old port while free
            process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # the old port stays taken (by something that never answers)
            try:
                taken.bind(("127.0.0.1", int(old["port"])))
                taken.listen(1)  # a listener: the supervisor's probe bind fails and it picks another port
                break
            except OSError:
                assert time.monotonic() < deadline, "the old port was not freed"
                time.sleep(0.001)
        deadline = time.monotonic() + 180
        while True:  # the supervisor's next server is up
            try:
                new = json.loads((state_dir / "server.json").read_text())
            except (OSError, ValueError):
                new = old
            if new["pid"] != old["pid"]:
                break
            assert time.monotonic() < deadline, "no new development server"
            time.sleep(0.2)
        wait_health(sidecar, 200, 180)
        assert new["port"] != old["port"], "the development server came back on its old port: no fault"
        response = sidecar.get("/ready")
        assert response.status_code == 200, response.text
        flow_run_id = response.json()["flowRunId"]
        api = new["url"].rstrip("/") + ("" if new["url"].rstrip("/").endswith("/api") else "/api")
        assert httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).status_code == 200
        deadline, logs = time.monotonic() + 30, []
        while not logs and time.monotonic() < deadline:
            time.sleep(0.5)
            found = httpx.post(f"{api}/logs/filter", timeout=10, json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
            found.raise_for_status()
            logs = found.json()
        assert logs, f"the flow run's log lines never reached the new server ({api}):\n{sidecar.output()[-2000:]}"
    finally:
        taken.close()
        sidecar.stop()
