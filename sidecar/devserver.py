"""One supervised Prefect server per working directory, shared by every sidecar started there.

Without ``PREFECT_API_URL`` a sidecar needs a Prefect API of its own. Prefect's fallback
(``SubprocessASGIServer``: one temporary server per process, 8 to 15 s and about 200 MB each, its UI
off, its SQLite database in ``PREFECT_HOME``) breaks down as soon as two sidecars share a working
directory (a parent and a child, ``scripts/dev`` twice, the offline Dispatcher): each starts its own
server on one database and they race each other's migrations; a SIGKILLed sidecar leaves its server
running; a server that dies is never restarted.

So the server belongs to a small supervisor process instead, one per state folder
(``{devdir}/prefect``), with three files there:

- ``supervisor.lock``: held exclusively (``flock``) by the one live supervisor. A second supervisor
  started at the same moment finds it taken and exits, so one database is only ever opened (and
  migrated) by one server.
- ``clients.lock``: every sidecar using the server holds a shared ``flock`` on it for its whole life.
  The kernel releases it when the sidecar exits, SIGKILL included, so when the supervisor can take it
  exclusively, no sidecar is left: after :data:`LINGER_SECONDS` it stops the server and exits. It
  keeps the lock while it stops, so a sidecar arriving then waits and starts a new supervisor.
- ``server.json``: the supervisor's pid and the server's URL, removed when the supervisor stops.
- ``port``: the server's port, kept from one supervisor to the next (reused while it is free), so the
  UI's address stays the same for a working directory.

The server is ``uvicorn prefect.server.api.server:create_app`` (what ``SubprocessASGIServer`` runs, but
with the UI on and not ephemeral, so Prefect's task-run recorder writes task runs), its database
``{devdir}/prefect/prefect.db``. The supervisor restarts it when it dies (back-off 1 s doubling to 10
s) or hangs (it answered ``/api/health`` once, then not for :data:`HUNG_SECONDS`, or never within
:data:`STARTUP_SECONDS`: stopped, deadlocked; it is killed and started again) and, on Linux, the server dies with the supervisor
(``PR_SET_PDEATHSIG``), so nothing is orphaned.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sidecar.childprocess import dies_with_parent

log = logging.getLogger(__name__)

# How long the server outlives the last sidecar, seconds: a parent's sidecar stopping and its child's
# starting right after share one server instead of paying for a new one.
LINGER_SECONDS = 5.0
# How often the supervisor looks at its server and its clients, seconds.
POLL_SECONDS = 0.5
# How long a server gets to stop on SIGTERM before SIGKILL, seconds.
STOP_SECONDS = 10.0
# How often the supervisor asks its server's /api/health, and how long it waits for an answer, seconds.
HEALTH_EVERY_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 5.0
# A server that answered once and then not for this long is hung: killed and started again, seconds
# (tests shorten it through the environment). One that never answered gets STARTUP_SECONDS (its first
# start creates and migrates the database: a minute or two on a loaded machine).
HUNG_SECONDS = float(os.environ.get("SIDECAR_DEVSERVER_HUNG_SECONDS", "30"))
STARTUP_SECONDS = 300.0

# Prefect services that schedule or police runs; the sidecar creates its runs itself, so they only
# add writes to SQLite. The task-run recorder and the event services stay on (task runs are recorded
# from events).
IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                 "REPOSSESSOR", "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER")


def server_env(state_dir: Path, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Prefect server keeping its database and home in ``state_dir`` and
    serving the API and the UI on ``127.0.0.1:port``."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("PREFECT_")]:
        if key not in ("PREFECT_LOGGING_LEVEL",):
            env.pop(key)
    url = f"http://127.0.0.1:{port}"
    env.update(
        PREFECT_HOME=str(state_dir),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{state_dir / 'prefect.db'}",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_ENABLED="true",
        PREFECT_UI_API_URL=f"{url}/api",
        PREFECT_UI_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_SERVER_LEVEL="WARNING",
    )
    for service in IDLE_SERVICES:
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    return env


def _free_port(preferred: int | None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_info(state_dir: Path) -> dict | None:
    """``server.json`` if the supervisor that wrote it is alive, else None."""
    try:
        info = json.loads((state_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and _pid_alive(int(info.get("pid", 0))) else None


def _write_info(state_dir: Path, info: dict) -> None:
    tmp = state_dir / f"server.json.{os.getpid()}"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, state_dir / "server.json")


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _answers(port: int) -> bool:
    """True when the server on ``127.0.0.1:port`` answers ``/api/health`` with 200 in time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/api/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class DevServerClient:
    """A sidecar's membership of the shared development server of ``state_dir``.

    :meth:`attach` joins (starting the supervisor when none runs) and returns the API URL; the
    membership lasts until :meth:`detach` or the process's exit, whatever the cause.

    Args:
        state_dir: the server's folder, ``{devdir}/prefect``; created if missing.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir).resolve()
        self._clients_fd: int | None = None

    def attach(self, timeout: float = 60.0) -> dict:
        """Join the server and return ``server.json``: ``{"pid", "port", "url", "ui"}``.

        Blocks (call it in a thread) while a supervisor is stopping, and until a supervisor has
        written ``server.json``; the server itself may still be starting (probe its ``/health``).

        Raises:
            TimeoutError: no supervisor published its URL within ``timeout`` seconds (its log,
                ``server.log`` in ``state_dir``, says why).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._clients_fd is None:
            fd = _open_lock(self.state_dir / "clients.lock")
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a supervisor is shutting its server down
            self._clients_fd = fd
        deadline = time.monotonic() + timeout
        spawned_at = 0.0
        while time.monotonic() < deadline:
            info = read_info(self.state_dir)
            if info is not None:
                return info
            if not self._supervisor_alive() and time.monotonic() - spawned_at > 5:
                self._spawn()
                spawned_at = time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"no Prefect development server in {self.state_dir} after {timeout}s "
                           f"(see {self.state_dir / 'server.log'})")

    def _supervisor_alive(self) -> bool:
        fd = _open_lock(self.state_dir / "supervisor.lock")
        try:
            if _try_lock(fd, fcntl.LOCK_SH):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            return True
        finally:
            os.close(fd)

    def _spawn(self) -> None:
        with open(self.state_dir / "supervisor.log", "ab") as out:
            # Its own session: a terminal's Ctrl-C or a SIGKILL of this sidecar must not take the
            # server from the other sidecars; it stops itself when the last one has gone.
            subprocess.Popen([sys.executable, "-m", "sidecar.devserver", str(self.state_dir)],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=self.state_dir)

    def detach(self) -> None:
        """Leave: the supervisor stops the server once no sidecar is attached."""
        if self._clients_fd is not None:
            os.close(self._clients_fd)
            self._clients_fd = None


class Supervisor:
    """The process that owns the server of ``state_dir`` (``python -m sidecar.devserver DIR``)."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir).resolve()
        self.server: subprocess.Popen | None = None
        self.stopping = False

    def run(self) -> int:
        """Serve until no client is left (or SIGTERM); returns the exit code."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _open_lock(self.state_dir / "supervisor.lock")
        # A client probing the lock holds it for microseconds; another supervisor holds it for good.
        for _ in range(40):
            if _try_lock(lock_fd, fcntl.LOCK_EX):
                break
            time.sleep(0.05)
        else:
            return 0
        clients_fd = _open_lock(self.state_dir / "clients.lock")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        previous = self._previous_port()
        port = _free_port(previous)
        url = f"http://127.0.0.1:{port}"
        (self.state_dir / "port").write_text(str(port))
        _write_info(self.state_dir, {"pid": os.getpid(), "port": port, "url": f"{url}/api", "ui": url})
        log.info("supervisor %s: Prefect server for %s on %s", os.getpid(), self.state_dir, url)
        backoff = 1.0
        next_start = started = 0.0
        idle_since: float | None = None
        answered: float | None = None  # when the running server last answered /api/health
        asked = 0.0
        try:
            while not self.stopping:
                # Asked every second until its first answer, then every HEALTH_EVERY_SECONDS.
                every = HEALTH_EVERY_SECONDS if answered is not None else 1.0
                if self.server is not None and self.server.poll() is None and time.monotonic() - asked >= every:
                    asked = time.monotonic()
                    if _answers(port):
                        if answered is None:
                            log.info("the Prefect server (pid %s) answers on port %s", self.server.pid, port)
                        answered = time.monotonic()
                    elif time.monotonic() - (answered or started) >= (HUNG_SECONDS if answered else STARTUP_SECONDS):
                        log.warning("the Prefect server (pid %s) has not answered for %.0f s: killing it",
                                    self.server.pid, time.monotonic() - (answered or started))
                        self.server.kill()
                        self.server.wait()
                if self.server is None or self.server.poll() is not None:
                    answered = None
                    if self.server is not None:
                        log.warning("Prefect server exited with %s; restarting in %.0fs", self.server.returncode, backoff)
                        self.server = None
                        next_start = time.monotonic() + backoff
                        backoff = min(backoff * 2, 10.0)
                    if time.monotonic() >= next_start:
                        self._start_server(port)
                        started = time.monotonic()
                elif time.monotonic() - started > 30:
                    backoff = 1.0
                if _try_lock(clients_fd, fcntl.LOCK_EX):
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= LINGER_SECONDS:
                        log.info("no sidecar left in %s; stopping the Prefect server", self.state_dir)
                        break  # keep the lock until the server is down and server.json is gone
                    fcntl.flock(clients_fd, fcntl.LOCK_UN)
                else:
                    idle_since = None
                time.sleep(POLL_SECONDS)
        finally:
            self._stop_server()
            try:
                (self.state_dir / "server.json").unlink()
            except FileNotFoundError:
                pass
            os.close(lock_fd)
            os.close(clients_fd)
        return 0

    def _previous_port(self) -> int | None:
        try:
            return int((self.state_dir / "port").read_text())
        except (OSError, ValueError):
            return None

    def _start_server(self, port: int) -> None:
        from importlib.util import find_spec

        site = Path(find_spec("prefect").origin).parent.parent  # type: ignore[union-attr, arg-type]
        argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(site), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--lifespan", "on"]
        with open(self.state_dir / "server.log", "ab") as out:
            self.server = subprocess.Popen(argv, env=server_env(self.state_dir, port), stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT, cwd=self.state_dir,
                                           preexec_fn=dies_with_parent())
        (self.state_dir / "server.pid").write_text(str(self.server.pid))
        log.info("started the Prefect server (pid %s) on port %s", self.server.pid, port)

    def _stop_server(self) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        self.server.terminate()
        try:
            self.server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        log.info("stopped the Prefect server")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    """``python -m sidecar.devserver STATE_DIR``: supervise that folder's Prefect server."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s devserver: %(message)s")
    if len(argv) != 1:
        print("usage: python -m sidecar.devserver STATE_DIR", file=sys.stderr)
        return 2
    return Supervisor(Path(argv[0])).run()


if __name__ == "__main__":
    raise SystemExit(main())
