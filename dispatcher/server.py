"""The Prefect API a graph run reports to: ``PREFECT_API_URL`` if set, else a server started for it.

Every sidecar of a graph run and the dispatcher's own graph flow must report to one API, or the graph
would be scattered over one temporary server per sidecar (and each would take 10-20 s to start). The
server started here keeps its history in Prefect's usual database (``PREFECT_HOME``, ``~/.prefect``),
so ``prefect server start`` shows the graph runs afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dispatcher.processes import free_port


def start_prefect_server(log: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port in its own process group.

    Args:
        log: file the server's output goes to.
        timeout: seconds to wait for ``/api/health``.

    Returns:
        The process and its API URL (``http://127.0.0.1:PORT/api``).

    Raises:
        RuntimeError: it exited or did not answer in time (the log's last lines in the message).
    """
    port = free_port()
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    last = log.read_text(errors="replace").splitlines()[-15:]
    raise RuntimeError("the Prefect server did not start:\n" + "\n".join(last))
