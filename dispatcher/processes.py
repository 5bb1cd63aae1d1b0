"""One attempt of one module run on this machine: a development-mode sidecar plus the module's command.

Both are started in process groups of their own (``start_new_session``), so stopping a group stops
whatever the module or the sidecar started (a shell's children, a temporary Prefect server), and a
Ctrl-C in the terminal reaches the dispatcher only, which then stops each group itself. Every group
still running is also in :data:`GROUPS`, which the command line stops on its way out whatever happened.
If the dispatcher itself is killed (SIGKILL, out of memory), the kernel stops the sidecar (SIGTERM: it
ends its call and reports its flow run) and the module (SIGKILL) it started
(``sidecar.childprocess.dies_with_parent``); processes the module started itself are its own to stop.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from sidecar.childprocess import dies_with_parent

# Every process group started and not yet stopped, by process group id.
GROUPS: dict[int, asyncio.subprocess.Process] = {}
# Marks every process of a graph run (value: the correlation id), so a test can find leftovers.
MARKER_ENV = "ION_OFFLINE_RUN"
LOG_LINES = 20


class ModuleRunFailed(Exception):
    """An attempt failed; the message is its reason. Raised inside a Prefect task or flow run so that
    Prefect records the failure (and retries the task run)."""


@dataclass
class ModuleRun:
    """What one attempt needs, JSON-able (the work-pool launcher sends it as a flow-run parameter).

    Attributes:
        module: the module's name (the sidecar's ``--context.name``).
        eventid, correlationid, parenteventid: the event's context (``--context.*``).
        attempt: 1 for the first attempt.
        command: the module's argv; ``cwd`` its working directory; ``env`` extra environment.
        valideventtypes: what the module may publish.
        timeoutseconds: how long the command may run, seconds.
        startupseconds: how long the sidecar may take to answer ``/healthz``, seconds.
        rundir: the graph run's folder; sidecars run there and share its ``.dev/``.
        folder: this attempt's folder: the module folder ``ion/`` and the logs.
    """

    module: str
    eventid: str
    correlationid: str
    parenteventid: str
    attempt: int
    command: list[str]
    cwd: str
    env: dict[str, str]
    valideventtypes: list[str]
    timeoutseconds: float
    startupseconds: float
    rundir: str
    folder: str

    @property
    def basedir(self) -> Path:
        return Path(self.folder) / "ion"

    @property
    def module_log(self) -> Path:
        return Path(self.folder) / "module.log"

    @property
    def sidecar_log(self) -> Path:
        return Path(self.folder) / "sidecar.log"


@dataclass
class Outcome:
    """How an attempt ended. ``ok``: the module exited 0 after a successful ``/done``; otherwise
    ``reason`` says why not. ``seconds``: from start to the end of the command."""

    ok: bool
    reason: str = ""
    exitcode: int | None = None
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (a sidecar that loses a race for it fails its
    attempt, which is retried)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = LOG_LINES) -> list[str]:
    """The last ``lines`` lines of the text file at ``path`` (none if it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []


def _python(argv: list[str]) -> list[str]:
    # "python" in a graph file means this interpreter (the one with the client and the sidecar).
    return [sys.executable, *argv[1:]] if argv and argv[0] == "python" else list(argv)


async def _start(argv: list[str], cwd: str, env: dict[str, str], log: Path,
                 on_our_death: int) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdout=out, stderr=out,
                                                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                                                    preexec_fn=dies_with_parent(on_our_death))
    GROUPS[proc.pid] = proc
    return proc


async def stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``grace`` seconds, and SIGKILL it once
    more after the leader exited, for members that outlived it. Never raises for a gone group."""
    try:
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                pass
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    finally:
        GROUPS.pop(proc.pid, None)


def kill_all_groups() -> int:
    """SIGKILL every process group in :data:`GROUPS` (the last resort on the way out); returns how many."""
    count = 0
    for pgid in list(GROUPS):
        _signal_group(pgid, signal.SIGKILL)
        GROUPS.pop(pgid, None)
        count += 1
    return count


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_attempt(run: ModuleRun, sidecar_grace: float = 15.0) -> Outcome:
    """Run one attempt: start the sidecar (development mode, its own free port, the attempt's module
    folder, context flags from the event), wait until it answers ``/healthz`` (at most
    ``startupseconds``), then start the module's command and watch both.

    The command starts once its sidecar is up, so its time-out measures the module's own work and not
    the sidecar's start-up (10-20 s on a loaded machine), and a sidecar that cannot start is reported as
    such instead of as a module that hung in its ``/ready`` retry loop.

    Success: the command exits 0 and the sidecar's ``/healthz`` reports phase ``done`` (a successful
    ``/done``). A failed attempt: the sidecar does not start, the command exits non-zero or by a
    signal, the sidecar exits first, the command outlives ``timeoutseconds``, or it exits 0 without
    ``/done``. Both process groups are stopped before this returns, also when it is cancelled (Ctrl-C).

    Returns:
        The :class:`Outcome`, with the last log lines (the module's, else the sidecar's) when it failed.
    """
    Path(run.folder).mkdir(parents=True, exist_ok=True)
    run.basedir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    port = free_port()
    base_env = {**os.environ, MARKER_ENV: run.correlationid, "SHARED_SECRET": secret}
    # The module's "python" and its client come from this interpreter's environment, as if activated.
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    sidecar_argv = [
        sys.executable, "-m", "sidecar", "--development=true",
        f"--context.eventid={run.eventid}", f"--context.correlationid={run.correlationid}",
        f"--context.parenteventid={run.parenteventid}", f"--context.name={run.module}",
        f"--valideventtypes={','.join(run.valideventtypes)}", f"--serverport={port}",
        f"--basedir={run.basedir}", f"--devdir={Path(run.rundir) / '.dev'}",
    ]
    module_env = {**base_env, **run.env, "SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": str(port),
                  "SIDECAR_BASEDIR": str(run.basedir), "SHARED_SECRET": secret}
    started = time.monotonic()
    sidecar = module = None
    try:
        sidecar = await _start(sidecar_argv, run.rundir, base_env, run.sidecar_log, signal.SIGTERM)
        problem = await _wait_healthy(sidecar, port, run.startupseconds)
        if problem:
            outcome = Outcome(False, problem, log=tail(run.sidecar_log))
        else:
            module = await _start(_python(run.command), run.cwd, module_env, run.module_log, signal.SIGKILL)
            outcome = await _watch(run, sidecar, module, port)
    finally:
        # Shielded: a Ctrl-C (cancellation) must not cut the clean-up short.
        stops = [stop_group(p, grace) for p, grace in ((module, 5.0), (sidecar, sidecar_grace)) if p is not None]
        await asyncio.shield(asyncio.gather(*stops))
    outcome.seconds = round(time.monotonic() - started, 3)
    if not outcome.ok and not outcome.log:
        outcome.log = tail(run.module_log) or tail(run.sidecar_log)
    return outcome


async def _wait_healthy(sidecar: asyncio.subprocess.Process, port: int, limit: float) -> str:
    """Poll the sidecar's ``/healthz`` until 200; returns "" then, else why it did not start."""
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if sidecar.returncode is not None:
                return f"the sidecar exited with code {sidecar.returncode} during start-up"
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return ""
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return f"the sidecar did not start within {limit:g} s"


async def _watch(run: ModuleRun, sidecar: asyncio.subprocess.Process, module: asyncio.subprocess.Process,
                 port: int) -> Outcome:
    module_exit = asyncio.ensure_future(module.wait())
    sidecar_exit = asyncio.ensure_future(sidecar.wait())
    try:
        finished, _ = await asyncio.wait({module_exit, sidecar_exit}, timeout=run.timeoutseconds,
                                         return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (module_exit, sidecar_exit):
            waiter.cancel()
    if not finished:
        return Outcome(False, f"timed out after {run.timeoutseconds:g} s; the module was killed")
    if module_exit not in finished:
        return Outcome(False, f"the sidecar exited with code {sidecar.returncode} before the module ended",
                       log=tail(run.sidecar_log))
    code = module.returncode
    if code != 0:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return Outcome(False, f"the module {how}", exitcode=code)
    phase = await _phase(port)
    if phase != "done":
        return Outcome(False, f"the module exited 0 without a successful /done (sidecar phase: {phase})", exitcode=0)
    return Outcome(True, exitcode=0)


async def _phase(port: int) -> str:
    """The sidecar's phase from ``/healthz`` (``new``, ``ready``, ``done``), or why it is unknown."""
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/healthz")
        return str(response.json().get("phase", "unknown"))
    except (httpx.HTTPError, ValueError) as exc:
        return f"unknown ({type(exc).__name__})"
