"""The offline Dispatcher (``ion-offline``) with real processes: real sidecars in development mode,
real module processes, the session's Prefect server.

One graph run (``graph.yaml``) holds four behaviours at once, since sidecar start-up dominates the time:
a fan-out (one event -> three module runs, at most two at once), a module run that fails once and is
retried (one commit), a module that always fails (dead letter after its attempts, with the reason and
its log lines) and a module that hangs (killed at its time-out with its child, nothing left behind).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dispatcher.graph import GraphError, load_graph
from tests.offline.support import (HERE, flow_runs_tagged, check_inputs_match_parents, graph_run_in_prefect, is_sidecar,
                                   leftovers, offline_argv, pid_alive, run_offline, summary, wait_for)
from testsupport.processes import python_env


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One graph run of ``graph.yaml`` to its end."""
    cwd = tmp_path_factory.mktemp("offline-faults")
    seed = cwd / "seed"
    (seed / "sub").mkdir(parents=True)
    (seed / "sub" / "hello.txt").write_bytes("héllo\n".encode())
    correlationid = f"corr-faults-{int(time.time())}"
    trace, pids = cwd / "trace.txt", cwd / "pids.txt"
    started = time.monotonic()
    result = run_offline(HERE / "graph.yaml", f"modules.worker.env.TRACE={trace}", f"modules.hang.env.PIDS={pids}",
                         "--files", str(seed), "--data", "label=faults", "--correlationid", correlationid,
                         "--rundir", str(cwd / "run"), cwd=cwd)
    return {"result": result, "rundir": cwd / "run", "cid": correlationid, "trace": trace, "pids": pids,
            "seed": seed, "seconds": time.monotonic() - started}


def runs_of(fault_run: dict, module: str) -> list[dict]:
    return [r for r in summary(fault_run["rundir"]) if r["module"] == module]


def test_graph_run_ends_with_a_summary_and_exit_code_1_for_its_dead_letters(fault_run: dict) -> None:
    result = fault_run["result"]
    print(f"fault graph run: {fault_run['seconds']:.1f} s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "module  " in result.stdout and "attempts" in result.stdout and "3 dead letters" in result.stdout
    statuses = sorted((r["module"], r["status"]) for r in summary(fault_run["rundir"]))
    assert statuses == [("broken", "Dead letter"), ("hang", "Dead letter"), ("lazy", "Dead letter"),
                        ("source", "Completed"), ("worker", "Completed"), ("worker", "Completed"),
                        ("worker", "Completed")]


def test_fan_out_runs_one_module_run_per_event_bounded_by_the_concurrency_limit(fault_run: dict) -> None:
    workers = runs_of(fault_run, "worker")
    assert len(workers) == 3 and {r["eventtype"] for r in workers} == {"item"}
    events = [(kind, float(at)) for kind, _, at in (line.split() for line in fault_run["trace"].read_text().splitlines())]
    assert sum(1 for kind, _ in events if kind == "start") == 4  # three runs, one of them twice
    running = peak = 0
    for kind, _ in sorted(events, key=lambda e: e[1]):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert 1 <= peak <= 2  # concurrency: 2


def test_a_module_run_that_fails_once_is_retried_and_commits_once(fault_run: dict) -> None:
    rundir = fault_run["rundir"]
    retried = [r for r in runs_of(fault_run, "worker") if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["status"] == "Completed"
    first, second = (json.loads((Path(f) / "outcome.json").read_text()) for f in retried[0]["folders"])
    assert not first["ok"] and first["reason"] == "the module exited with code 3" and second["ok"]
    # One commit: only the second attempt reached /done, and one 'checked' event per worker run.
    checked = [json.loads(p.read_text()) for p in (rundir / ".dev" / "events").glob("*.json")]
    checked = [e for e in checked if e["type"] == "checked"]
    assert len(checked) == 3 and len({e["context"]["parentEventId"] for e in checked}) == 3
    commits = ["done: committed" in (Path(f) / "sidecar.log").read_text() for f in retried[0]["folders"]]
    assert commits == [False, True]
    assert sum(1 for r in runs_of(fault_run, "worker") if r["attempts"] == 1) == 2


def test_a_module_that_always_fails_or_crashes_goes_to_the_dead_letter_folder_with_the_reason(fault_run: dict) -> None:
    [broken] = runs_of(fault_run, "broken")
    assert broken["attempts"] == 2
    letter = json.loads((fault_run["rundir"] / "deadletter" / f"broken--{broken['eventid']}.json").read_text())
    first = json.loads((Path(broken["folders"][0]) / "outcome.json").read_text())
    assert first["reason"] == "the module exited with code 4" and first["exitcode"] == 4
    # The dead letter carries the last attempt's reason: a crash.
    assert letter["attempts"] == 2 and letter["reason"] == "the module was killed by SIGKILL"
    assert letter["event"]["type"] == "start" and letter["event"]["context"]["eventId"] == broken["eventid"]
    assert "broken: the input cannot be read, giving up" in letter["logLines"]


def test_exit_0_without_done_is_a_failed_attempt_and_commits_nothing(fault_run: dict) -> None:
    [lazy] = runs_of(fault_run, "lazy")
    letter = json.loads((fault_run["rundir"] / "deadletter" / f"lazy--{lazy['eventid']}.json").read_text())
    assert letter["reason"] == "the module exited 0 without a successful /done (sidecar phase: ready)"
    metas = [json.loads(p.read_text()) for p in (fault_run["rundir"] / ".dev" / "documents" / "eventmeta").glob("*.json")]
    producers = {m["producer"] for m in metas}
    assert {"ion-offline", "source", "worker"} <= producers and "lazy" not in producers


def test_a_module_that_hangs_is_killed_at_its_time_out_with_its_children(fault_run: dict) -> None:
    [hang] = runs_of(fault_run, "hang")
    letter = json.loads((fault_run["rundir"] / "deadletter" / f"hang--{hang['eventid']}.json").read_text())
    assert letter["attempts"] == 1 and letter["reason"] == "timed out after 25 s; the module was killed"
    assert "hang: waiting for ever" in letter["logLines"]
    module_pid, child_pid = map(int, fault_run["pids"].read_text().split())
    assert not pid_alive(module_pid) and not pid_alive(child_pid)
    assert leftovers(fault_run["cid"]) == []  # no sidecar, module or child of this graph run is left


def test_every_child_stages_exactly_what_its_parent_wrote(fault_run: dict) -> None:
    # source's in/data against the seed folder, each worker's against source's out/data.
    assert check_inputs_match_parents(fault_run["rundir"], fault_run["seed"]) == 1 + 3


def test_the_graph_run_is_one_flow_run_with_a_task_run_per_module_run(fault_run: dict) -> None:
    cid = fault_run["cid"]
    graph, tasks, _ = graph_run_in_prefect(cid)
    assert graph.name == f"graph-{cid}" and graph.state.is_completed()
    by_name = {t.name: t for t in tasks}
    for record in summary(fault_run["rundir"]):
        task = by_name[f"{record['module']}-{record['eventid']}"]
        assert f"correlation:{cid}" in task.tags and f"module:{record['module']}" in task.tags
        assert task.state.is_completed() == (record["status"] == "Completed"), (record, task.state)
        assert task.run_count == record["attempts"]
    # The sidecars' own ready/done flow runs carry the same tag (flows/history.py), all Completed: the
    # failures above are the modules', never the sidecars'.
    sidecar_runs = flow_runs_tagged(f"correlation:{cid}")
    names = sorted(r.name.split("-")[0] for r in sidecar_runs if r.name != graph.name)
    # source, 4 worker attempts, lazy, hang
    assert names.count("ready") == 1 + 4 + 1 + 1 and names.count("done") == 1 + 3
    assert all(r.state.is_completed() for r in sidecar_runs), [(r.name, r.state.name) for r in sidecar_runs]


def test_ctrl_c_mid_graph_stops_every_process(tmp_path: Path) -> None:
    cid = f"corr-ctrl-c-{int(time.time())}"
    proc = _hanging_graph(tmp_path, cid)
    try:
        module_pid, child_pid = _hanging_module(proc, tmp_path)
        assert leftovers(cid)  # the sidecar, the module and its child run now
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ion-offline did not stop on SIGINT; {_stuck(proc, tmp_path / 'offline.log')}") from None
        assert code == 130, (tmp_path / "offline.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not pid_alive(module_pid) and not pid_alive(child_pid)
    assert leftovers(cid) == []


def _hanging_graph(tmp_path: Path, cid: str) -> subprocess.Popen:
    """ion-offline running, in ``tmp_path``, a graph of one module that hangs (with a child of its own)."""
    argv = offline_argv(HERE / "graph.yaml", f"modules.hang.env.PIDS={tmp_path / 'pids.txt'}",
                        "modules.hang.timeoutseconds=600", "~modules.source", "~modules.broken", "~modules.worker",
                        "~modules.lazy", "--correlationid", cid, "--rundir", str(tmp_path / "run"))
    with open(tmp_path / "offline.log", "wb") as out:
        return subprocess.Popen(argv, cwd=tmp_path, env=python_env(), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_as_foreground_job)


def _hanging_module(proc: subprocess.Popen, tmp_path: Path) -> tuple[int, int]:
    """Wait until the hanging module of :func:`_hanging_graph` runs; its pid and its child's."""
    pids = tmp_path / "pids.txt"
    wait_for(lambda: pids.exists() and pids.read_text().strip() != "" or proc.poll() is not None, 300,
             "the hanging module to start")
    assert proc.poll() is None, (tmp_path / "offline.log").read_text()
    module_pid, child_pid = map(int, pids.read_text().split())
    return module_pid, child_pid


def _as_foreground_job() -> None:
    """Give the child SIGINT's default disposition, as a terminal's foreground job has it (Ctrl-C). A
    suite started in the background (``cmd &`` in a script) runs with SIGINT ignored (POSIX), and
    every child inherits that, so ion-offline would rightly ignore the test's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stuck(proc: subprocess.Popen, log: Path) -> str:
    """What a process that ignored a signal is doing: its signal masks and every thread's stack
    (ion-offline prints them on SIGUSR1), then its log."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    masks = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))]
    proc.send_signal(signal.SIGUSR1)
    time.sleep(3)
    return f"{masks}\n{log.read_text()}"


def test_a_killed_dispatcher_leaves_no_sidecar_or_module_running(tmp_path: Path) -> None:
    """SIGKILL, not Ctrl-C: the dispatcher cannot stop anything itself. The kernel stops the sidecar and
    the module it started (parent-death signal), the development Prefect server's supervisor then stops
    with its last sidecar; only what the module started itself is left, and the test stops it."""
    cid = f"corr-killed-{int(time.time())}"
    proc = _hanging_graph(tmp_path, cid)
    grandchild = None
    try:
        module_pid, child_pid = _hanging_module(proc, tmp_path)
        grandchild = psutil.Process(child_pid)
        sidecars = [p for p in leftovers(cid) if is_sidecar(p)]
        assert sidecars, [p.cmdline() for p in leftovers(cid)]
        proc.kill()
        proc.wait(30)
        wait_for(lambda: [p.pid for p in leftovers(cid)] == [child_pid], 120,
                 "only the module's own child to be left")
        assert not pid_alive(module_pid) and not any(pid_alive(p.pid) for p in sidecars)
    finally:
        if proc.poll() is None:
            proc.kill()
        if grandchild is not None and grandchild.is_running():
            grandchild.kill()
        for left in leftovers(cid):
            left.kill()


def test_a_graph_file_error_names_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("initial: {type: start}\nmodules:\n  m: {command: [x], subscribes: [start], attempts: zero}\n")
    with pytest.raises(GraphError, match=r"bad.yaml: key modules.m.attempts"):
        load_graph(bad)
    bad.write_text("initial: {type: start}\nmodules:\n  m: {command: [x], subscribes: [other]}\n")
    with pytest.raises(GraphError, match=r"bad.yaml: key initial.type: no module subscribes to 'start'"):
        load_graph(bad)
    bad.write_text("initial: {type: start}\nmodules:\n  m: {command: [x], subscribes: [start], colour: red}\n")
    with pytest.raises(GraphError, match=r"bad.yaml: key modules.m.colour"):
        load_graph(bad)
    result = run_offline(bad, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "bad.yaml: key modules.m.colour" in result.stderr


def test_a_used_graph_run_folder_is_refused(fault_run: dict, tmp_path: Path) -> None:
    result = run_offline(HERE / "graph.yaml", "--rundir", str(fault_run["rundir"]), cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "already holds a graph run" in result.stderr
