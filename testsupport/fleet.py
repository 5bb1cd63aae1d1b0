"""A fleet of module runs against one Prefect server: what ``tests/test_fleet.py`` asserts and
``bench/fleet.py`` times.

One wave is N module runs at once, each a real sidecar process (development providers, one shared
working directory so children read their parents' events) and a module thread doing what
``examples/module.py`` does: every sidecar healthy first, then every ``/ready`` at once, then each
module writes 5 files, 2 events and an insight, then every ``/done`` at once. A fleet is a wave of N
parents followed by a wave of N children, each child handling the first event of one parent.
Calls are made once, without the client's retries: a call that does not answer 200 is a failure.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from testsupport.processes import SidecarProcess, dev_args


@dataclass
class Wave:
    """What one wave measured: seconds, the slowest call (seconds), failed calls, RSS per sidecar
    (bytes, after its /done) and every flow run id the calls answered."""

    runs: int
    seconds: float = 0.0
    startup_seconds: float = 0.0
    slowest_call: float = 0.0
    failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    flow_run_ids: list[str] = field(default_factory=list)
    children: list[tuple[str, str]] = field(default_factory=list)  # (event id, parent event id)


def _module_outputs(basedir: Path, index: int) -> None:
    data = basedir / "out" / "data"
    (data / "found").mkdir(parents=True, exist_ok=True)
    for f in range(5):
        (data / "found" / f"file{f}.txt").write_text(f"module {index} file {f}\n" * 50)
    events = basedir / "out" / "events"
    events.mkdir(parents=True, exist_ok=True)
    for e in range(2):
        pairs = [{"key": "eventType", "value": "file_discovered"},
                 {"key": "files", "value": f"found/file{e}.txt"}, {"key": "n", "value": str(e)}]
        (events / f"event{e}.json").write_text(json.dumps(pairs))
    (basedir / "out" / "meta.json").write_text('[{"key": "files", "value": "5"}]')


def run_wave(cwd: Path, api_url: str, n: int, *, prefix: str, parents: list[tuple[str, str]] | None = None,
             extra_args: list[str] | None = None, timeout: float = 600) -> Wave:
    """Run ``n`` module runs at once against the Prefect API ``api_url``.

    Args:
        cwd: the shared working directory (its ``.dev`` is the data plane).
        prefix: names this wave's event ids and module names.
        parents: for a wave of children, ``(event id, parent event id)`` per run (length ``n``).
        extra_args: more sidecar flags, e.g. a fleet-wide concurrency limit.
    """
    wave = Wave(runs=n)
    env = {"PREFECT_API_URL": api_url}
    sidecars: list[SidecarProcess] = []
    started = time.monotonic()
    try:
        for i in range(n):
            event, parent = parents[i] if parents else (f"{prefix}-evt-{i}", "")
            args = dev_args(event, f"{prefix}-corr", f"{prefix}-mod{i}", parent=parent) + list(extra_args or [])
            sidecars.append(SidecarProcess(cwd, args, env=env, basedir=cwd / f"ion-{prefix}-{i}"))
        for sidecar in sidecars:
            sidecar.wait_healthy(timeout=timeout)
        wave.startup_seconds = time.monotonic() - started
        lock = threading.Lock()
        go_ready = threading.Barrier(n)
        go_done = threading.Barrier(n)

        def module(i: int, sidecar: SidecarProcess) -> None:
            def call(path: str) -> dict | None:
                t = time.monotonic()
                try:
                    response = sidecar.get(path, timeout=timeout)
                except httpx.HTTPError as exc:
                    response = None
                    problem = f"{type(exc).__name__}: {exc}"
                took = time.monotonic() - t
                with lock:
                    wave.slowest_call = max(wave.slowest_call, took)
                    if response is not None and response.status_code == 200:
                        wave.flow_run_ids.append(response.json()["flowRunId"])
                        return response.json()
                    if response is not None:
                        problem = f"{response.status_code} {response.text[:300]}"
                    wave.failures.append(f"{sidecar.basedir.name} {path}: {problem}")
                return None

            go_ready.wait()
            try:
                if call("/ready") is None:
                    go_done.abort()
                    return
                _module_outputs(sidecar.basedir, i)
            except Exception as exc:  # noqa: BLE001 - a failure of this run, not a wave that waits for ever
                with lock:
                    wave.failures.append(f"{sidecar.basedir.name} before /done: {type(exc).__name__}: {exc}")
                go_done.abort()  # the others would wait at the barrier for this thread
                return
            try:
                go_done.wait()
            except threading.BrokenBarrierError:
                pass
            summary = call("/done")
            if summary:
                rss = psutil.Process(sidecar.proc.pid).memory_info().rss
                with lock:
                    wave.rss.append(rss)
                    wave.children.append((summary["events"][0]["eventId"], sidecar_event(sidecar)))

        t0 = time.monotonic()
        threads = [threading.Thread(target=module, args=(i, s)) for i, s in enumerate(sidecars)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wave.seconds = time.monotonic() - t0
    finally:
        for sidecar in sidecars:
            sidecar.stop()
    return wave


def sidecar_event(sidecar: SidecarProcess) -> str:
    """The event id a sidecar process was started for (from its argv)."""
    for arg in sidecar.proc.args:
        if str(arg).startswith("--context.eventid="):
            return str(arg).split("=", 1)[1]
    raise ValueError("no --context.eventid")


def run_fleet(cwd: Path, api_url: str, n: int, *, extra_args: list[str] | None = None) -> tuple[Wave, Wave]:
    """A wave of ``n`` parents, then a wave of ``n`` children of their first events."""
    parents = run_wave(cwd, api_url, n, prefix="p", extra_args=extra_args)
    children = run_wave(cwd, api_url, len(parents.children), prefix="c", parents=parents.children,
                        extra_args=extra_args) if parents.children else Wave(runs=0)
    return parents, children


def process_tree_rss(pid: int) -> int:
    """RSS of process ``pid`` and its children, bytes."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
