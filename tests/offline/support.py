"""Helpers of the offline Dispatcher's tests: run ``ion-offline``, read what a graph run left behind,
check bytes across parent and child, find leftover processes, read the graph run from Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dispatcher.processes import MARKER_ENV
from testsupport.processes import ROOT, python_env

HERE = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "hash-files"


def offline_argv(graph: Path, *args: str) -> list[str]:
    """The ``ion-offline`` command line (this interpreter, this checkout)."""
    return [sys.executable, "-m", "dispatcher.cli", str(graph), *args]


def run_offline(graph: Path, *args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run ``ion-offline graph args...`` to its end; its output is in the result (and cwd/offline.log)."""
    result = subprocess.run(offline_argv(graph, *args), cwd=cwd, env=python_env(), capture_output=True,
                            text=True, timeout=timeout)
    (cwd / "offline.log").write_text(result.stdout + result.stderr)
    return result


def summary(rundir: Path) -> list[dict]:
    """``summary.json``'s module runs, in the order they started."""
    return json.loads((rundir / "summary.json").read_text())["runs"]


def leftovers(correlationid: str) -> list[psutil.Process]:
    """Processes still alive that a graph run started (marked with its correlation id)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) == correlationid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def is_sidecar(proc: psutil.Process) -> bool:
    """``proc`` is a sidecar as the dispatcher starts one (``python -m sidecar ...``, dispatcher/processes.py):
    told by its argv, never by a substring of the command line, which holds the checkout's path
    (``.../ion-sidecar/.venv/bin/python``) for every process a graph run starts."""
    try:
        return proc.cmdline()[1:3] == ["-m", "sidecar"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def check_inputs_match_parents(rundir: Path, seed_files: Path | None) -> int:
    """Every completed attempt's ``in/data`` holds exactly the files its event lists, each byte-identical
    to what the parent wrote in its ``out/data`` (the seed's: the ``--files`` folder). Returns the number
    of files compared.

    Raises:
        AssertionError: naming the run and file that differ.
    """
    compared = 0
    for outcome in rundir.glob("runs/*/*/attempt-*/outcome.json"):
        if not json.loads(outcome.read_text())["ok"]:
            continue
        attempt = outcome.parent
        eventid = attempt.parent.name
        meta = json.loads((rundir / ".dev" / "documents" / "eventmeta" / f"{eventid}.json").read_text())
        in_data = attempt / "ion" / "in" / "data"
        staged = sorted(p.relative_to(in_data).as_posix() for p in in_data.rglob("*") if p.is_file())
        assert staged == sorted(f["path"] for f in meta["files"]), attempt
        for f in meta["files"]:
            if meta["producer"] == "ion-offline":
                written = seed_files / f["path"]
            else:  # the parent's last (successful) attempt
                parents = sorted((rundir / "runs" / meta["producer"] / meta["parentEventId"]).glob("attempt-*"))
                written = parents[-1] / "ion" / "out" / "data" / f["path"]
            assert (in_data / f["path"]).read_bytes() == written.read_bytes(), (attempt, f["path"])
            compared += 1
    return compared


def graph_run_in_prefect(correlationid: str, timeout: float = 30) -> tuple[object, list, list]:
    """The graph's flow run ``graph-{correlationid}``, its task runs and its child flow runs, read through
    the Prefect API (what the UI shows) once every task run has a final state."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as api:
            runs = await api.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"graph-{correlationid}"])))
            assert len(runs) == 1, runs
            graph = runs[0]
            deadline = time.monotonic() + timeout
            while True:
                tasks = await api.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [graph.id]}))
                children = await api.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[graph.id])))
                settled = all(t.state is not None and t.state.is_final() for t in tasks)
                if settled or time.monotonic() > deadline:
                    return graph, tasks, children
                await asyncio.sleep(0.3)

    return asyncio.run(read())


def flow_runs_tagged(tag: str) -> list:
    """Every flow run carrying ``tag``, read through the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def read():
        async with get_client() as api:
            return await api.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))

    return asyncio.run(read())


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


__all__ = ["EXAMPLE", "HERE", "check_inputs_match_parents", "flow_runs_tagged", "graph_run_in_prefect", "leftovers", "offline_argv",
           "pid_alive", "run_offline", "summary", "wait_for"]
