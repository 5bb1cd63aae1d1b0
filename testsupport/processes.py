"""Processes the tests and benchmarks start, and what they need to: free ports, waiting for HTTP,
stopping process groups, the Prefect server (SQLite, or PostgreSQL in a temporary cluster), a real
``sidecar`` process (also one restarted like a container), the example module, Prefect run history."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sidecar.childprocess import dies_with_parent

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SECRET = "test-secret-Zq9"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, ok=(200,), proc: subprocess.Popen | None = None,
              verify: ssl.SSLContext | bool = True) -> httpx.Response:
    """Poll ``url`` until it answers with a status in ``ok``; fail after ``timeout`` seconds.
    ``verify``: the TLS context (trusted CAs) for an https ``url``, as httpx takes it."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2, verify=verify)
            if response.status_code in ok:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports this checkout's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start_prefect_server(home: Path, record_task_runs: bool = True,
                         database_url: str | None = None, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port with ``PREFECT_HOME=home``; returns the
    process (its own session, log in ``home/server.log``) and its API URL once ``/health`` answers.

    ``record_task_runs``: task runs reach the API as events that the task-run recorder service writes,
    so services run, except those that schedule or police runs (none exist here; they only add writes
    to SQLite). False: ``--no-services``, no task runs in the API. ``database_url``: the server's
    database (``PREFECT_API_DATABASE_CONNECTION_URL``, e.g. :attr:`Postgres.url`); default SQLite in ``home``.
    ``port``: listen there (a restarted server keeps its URL); default a free one.

    Raises:
        RuntimeError: the server did not answer within 120 s (its log in the message).
    """
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env.update(postgres_server_env(database_url))
    for service in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                    "REPOSSESSOR", "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER"):
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    port = port or free_port()
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen(argv + ([] if record_task_runs else ["--no-services"]), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=dies_with_parent())
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()}") from None
    return proc, url


def postgres_server_env(database_url: str) -> dict[str, str]:
    """What a Prefect server on PostgreSQL needs besides its defaults: the database URL (driver
    ``postgresql+asyncpg``) and a connection pool sized for a fleet (Prefect's default is 5 plus 10
    overflow per server process; a fleet's bursts of state proposals queue on it)."""
    return {"PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20"}


class Postgres:
    """A temporary PostgreSQL cluster (Debian's ``postgresql`` package) in ``root`` on a free loopback
    port, with a database ``prefect``; trust authentication, loopback only, stopped by :meth:`stop`.

    ``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user and
    every server command runs as that user. The postmaster runs in the foreground as this process's
    child (not daemonised by ``pg_ctl start``), so it gets SIGQUIT (immediate shutdown, its backends
    with it) when its parent dies (:func:`dies_with_parent`).

    Raises:
        RuntimeError: no PostgreSQL binaries (``scripts/setup test`` installs them), or the cluster
            did not start (its log in the message).
    """

    def __init__(self, root: Path):
        import glob
        import shutil

        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
        if not bindirs:
            raise RuntimeError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin); run scripts/setup test")
        self.bin = Path(bindirs[-1])
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.log = root / "postgres.log"
        self.as_user: list[str] = []
        user = None
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = "postgres"
            self.as_user = ["runuser", "-u", user, "--"]
            shutil.chown(root, "postgres")
            for parent in root.parents:  # the postgres user must be able to reach its folder
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.user = user
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")

    def start(self) -> None:
        """Start the postmaster on the cluster (again, after :meth:`stop`: same port, same data) and
        wait until it accepts connections."""
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        user = self.user
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, user=user, group=user,
                                         extra_groups=[] if user else None, start_new_session=True,
                                         preexec_fn=dies_with_parent(signal.SIGQUIT))
        deadline = time.monotonic() + 60
        while subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"postgres did not start ({self.proc.poll()}):\n{self.log.read_text()}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect takes (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr or result.stdout}\n{log}")

    def stop(self) -> None:
        """Stop the cluster (fast shutdown); its files stay in ``root`` for the caller to delete."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown
                self.proc.wait(30)


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a service started with ``start_new_session=True``: SIGTERM its process group, SIGKILL
    after 15 s, and wait for it (nothing if it already exited)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class SidecarProcess:
    """A ``python -m sidecar`` process in ``cwd`` with ``args`` (seed flags), on a free port.

    The module's folders are ``basedir`` (default ``cwd/ion``); development data lives in ``cwd/.dev``.
    """

    def __init__(self, cwd: Path, args: list[str], *, secret: str = SECRET, env: dict[str, str] | None = None,
                 basedir: Path | None = None):
        self.cwd = cwd
        self.port = free_port()
        self.secret = secret
        self.basedir = basedir or cwd / "ion"
        self.log = cwd / f"sidecar-{self.basedir.name}-{self.port}.log"  # a later sidecar may get the same port
        argv = [sys.executable, "-m", "sidecar", f"--serverport={self.port}", f"--basedir={self.basedir}",
                f"--sharedsecret={secret}", *args]
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=python_env(**(env or {})), stdout=self.out, stderr=subprocess.STDOUT,
                                     preexec_fn=dies_with_parent())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until ``/healthz`` answers 200 (the Prefect API is usable)."""
        try:
            wait_http(f"{self.url}/healthz", timeout, proc=self.proc)
        except Exception:
            raise AssertionError(f"sidecar did not become healthy:\n{self.output()}") from None

    def get(self, path: str, timeout: float = 120, secret: str | None = None) -> httpx.Response:
        """``GET path`` with the shared secret header."""
        headers = {"secret": self.secret if secret is None else secret}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout)

    def output(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode

    def __enter__(self) -> "SidecarProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dev_args(event_id: str, correlation_id: str, name: str, *, parent: str = "", types: str = "file_discovered") -> list[str]:
    """Seed flags for a development-mode sidecar."""
    args = ["--development=true", f"--context.eventid={event_id}", f"--context.correlationid={correlation_id}",
            f"--context.name={name}", f"--valideventtypes={types}"]
    if parent:
        args.append(f"--context.parenteventid={parent}")
    return args


def read_runs(flow_run_ids: list[str], settled, timeout: float = 30) -> tuple[list, list]:
    """The flow runs ``flow_run_ids`` and their task runs, read through the Prefect API (what the UI
    shows). Task runs are recorded from events, so their rows, names and states settle shortly after
    the flow run ends: this polls until ``settled(task_runs)`` is true or ``timeout`` seconds pass."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    PAGE = 200

    async def all_task_runs(api) -> list:
        # Page by page in a stable order: the API answers at most PREFECT_API_DEFAULT_LIMIT (200) rows
        # per read (a fleet of 30 has 330 task runs).
        runs: list = []
        while True:
            page = await api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                                            sort=TaskRunSort.ID_DESC, offset=len(runs), limit=PAGE)
            runs += page
            if len(page) < PAGE:
                return runs

    async def read() -> tuple[list, list]:
        async with get_client() as api:
            flow_runs = [await api.read_flow_run(i) for i in flow_run_ids]
            deadline = time.monotonic() + timeout
            while True:
                task_runs = await all_task_runs(api)
                if settled(task_runs) or time.monotonic() > deadline:
                    return flow_runs, task_runs
                await asyncio.sleep(0.2)

    return asyncio.run(read())


def read_json(path: Path) -> object:
    return json.loads(path.read_text())


def run_module(sidecar: SidecarProcess, **env: str) -> list[dict]:
    """Run examples/module.py against ``sidecar``; returns the JSON lines it printed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "module.py")],
        env=python_env(SHARED_SECRET=SECRET, SIDECAR_PORT=str(sidecar.port), SIDECAR_BASEDIR=str(sidecar.basedir), **env),
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{result.stderr}\n--- sidecar ---\n{sidecar.output()}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def run_child_of_file2(tmp_path: Path, child_args: list[str]) -> list[dict]:
    """Run the child sidecar and module for the parent's file2 event in the same working directory
    (the chain goes through the data plane), check what it staged; returns the module's JSON lines."""
    (tmp_path / "ion").rename(tmp_path / "ion-parent")
    with SidecarProcess(tmp_path, child_args) as child:
        lines = run_module(child, EVENT_LABEL="child", FILES="1")
    staged = lines[0]
    assert staged["inputs"] == ["found/file2.txt"]
    assert (tmp_path / "ion" / "in" / "data" / "found" / "file2.txt").read_bytes() == \
        (tmp_path / "ion-parent" / "out" / "data" / "found" / "file2.txt").read_bytes()
    assert staged["meta"]["index"] == "2" and "eventType" not in staged["meta"] and "files" not in staged["meta"]
    assert staged["ready"]["files"] == 1 and staged["ready"]["bytes"] > 0
    return lines


class RestartableSidecar:
    """``python -m sidecar`` with ``args`` on a fixed port, started again by :meth:`restart` with the
    same command line, as the kubelet restarts a container. Log lines of every start go to ``log``."""

    def __init__(self, workdir: Path, args: list[str], port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.basedir = workdir / "ion"
        self.argv = [sys.executable, "-m", "sidecar", f"--serverport={self.port}", f"--basedir={self.basedir}",
                     f"--sharedsecret={SECRET}", *args]
        self.log = workdir / "sidecar.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, pause_at: str | None = None, nofile: int | None = None, **env: str) -> "RestartableSidecar":
        """Start the process; with ``pause_at`` it stops itself (SIGSTOP) at that crash point; with
        ``nofile`` its open-file limit (soft and hard, as ``ulimit -n``) is that many descriptors."""
        extra = dict(env)
        if pause_at:
            extra["SIDECAR_TEST_PAUSE_AT"] = pause_at
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts} (pause at {pause_at})\n".encode())
            limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=python_env(**extra), stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=dies_with_parent(then=limit))
        return self

    def wait_paused(self, timeout: float = 120) -> None:
        """Wait until the process froze itself at its crash point."""
        import psutil  # a test extra; only this wait needs it

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode} before its pause:\n{self.output()}")
            if psutil.Process(self.proc.pid).status() == psutil.STATUS_STOPPED:
                return
            time.sleep(0.05)
        raise AssertionError(f"sidecar never reached its pause point:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or an eviction does."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"sidecar did not stop within {timeout} s of SIGTERM:\n{self.output()}")

    def wait_healthy(self, timeout: float = 120) -> None:
        try:
            wait_http(f"{self.url}/healthz", timeout, proc=self.proc)
        except Exception:
            raise AssertionError(f"sidecar did not become healthy:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
