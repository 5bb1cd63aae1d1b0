"""What the restart trials (``tests/restart``) share: a development-mode module run frozen at a crash point of
its /done (started, healthy, staged, its outputs written, and the sidecar told to stop itself, SIGSTOP,
when it reaches the step: ``sidecar/crashpoints.py``), a call left running while the sidecar is stopped,
and the run record it keeps on the volume."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import httpx

from ion_sidecar_client import SidecarClient
from testsupport.processes import SECRET, RestartableSidecar


def dev_run_pausing_at(workdir: Path, sidecars: list, step: str, event_id: str, correlation_id: str, *,
                       files: int, events: int, content: Callable[[int], bytes], insight: dict[str, str],
                       event_types: str = "file_discovered", flags: tuple[str, ...] = ()
                       ) -> tuple[RestartableSidecar, SidecarClient]:
    """Start a sidecar (module ``mod``, development providers under ``workdir/.dev``) that freezes at
    ``step``, wait until it is healthy, call ``/ready``, and write the module's outputs: ``files`` files
    ``d/f{i}.bin`` holding ``content(i)``, ``events`` events ``e{i}`` of type ``file_discovered`` each naming
    ``d/f{i}.bin`` with the pair ``index``, and an insight of ``insight``. ``event_types`` is
    ``--valideventtypes``; ``flags`` are added to the command line. The sidecar is appended to ``sidecars`` (the tests' fixture stops them). Returns the
    sidecar and the module's client; ``/done`` is the caller's to call."""
    args = ["--development=true", f"--context.eventid={event_id}", f"--context.correlationid={correlation_id}",
            "--context.name=mod", f"--valideventtypes={event_types}", f"--devdir={workdir / '.dev'}", *flags]
    sidecar, client = started_and_staged(workdir, sidecars, args, step)
    for i in range(files):
        client.write_file(f"d/f{i}.bin", content(i))
    for i in range(events):
        client.write_event(f"e{i}", "file_discovered", [f"d/f{i}.bin"], index=str(i))
    client.write_insight(**insight)
    return sidecar, client


def started_and_staged(workdir: Path, sidecars: list, args: list[str], step: str
                       ) -> tuple[RestartableSidecar, SidecarClient]:
    """Start a sidecar in ``workdir`` with the flags ``args`` that freezes at crash point ``step``, append it
    to ``sidecars`` (the tests' fixture stops them), wait until it is healthy and call ``/ready`` (retried
    for up to 60 s); returns the sidecar and the module's client."""
    sidecar = RestartableSidecar(workdir, args)
    sidecars.append(sidecar)
    sidecar.start(pause_at=step)
    sidecar.wait_healthy()
    client = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
    client.ready(retry_seconds=60)
    return sidecar, client


def record(sidecar: RestartableSidecar) -> dict:
    """The sidecar's run record (``{basedir}/.sidecar/run.json``, ``sidecar.runstate``) as JSON."""
    return json.loads((sidecar.basedir / ".sidecar" / "run.json").read_text())


def call_in_background(sidecar: RestartableSidecar, path: str = "/done") -> tuple[threading.Thread, list]:
    """Call ``path`` on ``sidecar`` in a thread (the module waiting while the sidecar is frozen, killed or
    stopped); returns the thread and a list that gets its one answer: the response, or the
    ``httpx.HTTPError`` the call ended with."""
    answers: list = []

    def call() -> None:
        try:
            answers.append(httpx.get(f"{sidecar.url}{path}", headers={"secret": SECRET}, timeout=120))
        except httpx.HTTPError as exc:
            answers.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    return caller, answers
