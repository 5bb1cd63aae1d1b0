"""A SIGKILLed sidecar's flow run does not stay Running: the restarted sidecar finds it in the run
record (``{basedir}/.sidecar/run.json``, ``unreported``) and reports it before it calls itself healthy:
Crashed when it was killed mid-call (the resumed call is a new flow run that ends Completed), or
Completed when its ``/done`` had committed and answered during an outage of the Prefect API. Real
processes: a development-mode sidecar frozen at a step of ``/done`` (``SIDECAR_TEST_PAUSE_AT``),
SIGKILLed and started again with the same flags, against a real Prefect server."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from testsupport.processes import SECRET, RestartableSidecar, dev_args, free_port, start_prefect_server
from testsupport.restart import record

FILES = 6
pytestmark = pytest.mark.timeout(900)  # two Prefect server starts and an outage the client retries ~60 s


def api_url() -> str:
    return os.environ["PREFECT_API_URL"].rstrip("/")


def flow_run(flow_run_id: str, url: str | None = None) -> dict:
    response = httpx.get(f"{url or api_url()}/flow_runs/{flow_run_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def get(sidecar: RestartableSidecar, path: str) -> httpx.Response:
    return httpx.get(f"{sidecar.url}{path}", headers={"secret": SECRET}, timeout=300)


def write_outputs(basedir: Path) -> None:
    data = basedir / "out" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        (data / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    events = basedir / "out" / "events"
    events.mkdir(parents=True, exist_ok=True)
    (events / "e1.json").write_text('[{"key": "eventType", "value": "file_discovered"}, '
                                     '{"key": "files", "value": "f0.txt"}]')


def test_sigkilled_flow_run_is_crashed_by_the_restarted_sidecar(tmp_path: Path, sidecars: list[RestartableSidecar]) -> None:
    sidecar = RestartableSidecar(tmp_path, dev_args("evt-crashed", "corr-crashed", "mod"))
    sidecars.append(sidecar)
    sidecar.start(pause_at="uploaded-file#2")
    sidecar.wait_healthy()
    ready = get(sidecar, "/ready")
    assert ready.status_code == 200, ready.text
    assert record(sidecar)["unreported"] == {}, "a reported flow run stayed in the record"
    assert flow_run(ready.json()["flowRunId"])["state"]["type"] == "COMPLETED"
    write_outputs(sidecar.basedir)

    # /done freezes after two of six uploads; its flow run is Running and recorded as unreported.
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(_get_or_error(sidecar, "/done")), daemon=True)
    caller.start()
    sidecar.wait_paused()
    unreported = record(sidecar)["unreported"]
    assert list(unreported.values()) == [None], unreported
    old = next(iter(unreported))
    assert old != ready.json()["flowRunId"]
    assert flow_run(old)["state"]["type"] == "RUNNING"

    # SIGKILL: the call never answers and the flow run really is left Running.
    sidecar.kill()
    caller.join(30)
    assert answers and isinstance(answers[0], httpx.TransportError), answers
    assert flow_run(old)["state"]["type"] == "RUNNING"

    # The successor reports the old flow run Crashed (with a message) before /healthz says 200.
    sidecar.start()
    sidecar.wait_healthy()
    crashed = flow_run(old)["state"]
    assert crashed["type"] == "CRASHED", crashed
    assert "stopped before its call finished" in crashed["message"], crashed
    assert "left RUNNING by a previous sidecar: reported CRASHED" in sidecar.output()

    # The resumed /done is a new flow run, Completed; nothing is left unreported.
    done = get(sidecar, "/done")
    assert done.status_code == 200, done.text
    new = done.json()["flowRunId"]
    assert new != old and flow_run(new)["state"]["type"] == "COMPLETED"
    blobs = tmp_path / ".dev" / "blobs" / "evt-crashed" / "mod"
    assert sorted(p.name for p in blobs.rglob("*.txt")) == sorted(f"f{i}.txt" for i in range(FILES))
    assert record(sidecar)["unreported"] == {}
    assert sidecar.stop() == 0
    assert flow_run(old)["state"]["type"] == "CRASHED"


def _get_or_error(sidecar: RestartableSidecar, path: str) -> httpx.Response | Exception:
    try:
        return get(sidecar, path)
    except httpx.HTTPError as exc:
        return exc


def test_committed_done_is_reported_completed_by_the_restarted_sidecar(tmp_path: Path,
                                                                        sidecars: list[RestartableSidecar]) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    server, url = start_prefect_server(home, port=port)
    try:
        sidecar = RestartableSidecar(tmp_path, dev_args("evt-known", "corr-known", "mod") +
                                     ["--prefectstartuptimeoutseconds=2"])
        sidecars.append(sidecar)
        sidecar.start(pause_at="published", PREFECT_API_URL=url)
        sidecar.wait_healthy()
        assert get(sidecar, "/ready").status_code == 200
        write_outputs(sidecar.basedir)

        # /done freezes after everything is committed; the Prefect server dies; /done goes on and answers
        # 200 while the API is down, its final state (Completed) known but not reported.
        answers: list = []
        caller = threading.Thread(target=lambda: answers.append(_get_or_error(sidecar, "/done")), daemon=True)
        caller.start()
        sidecar.wait_paused()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        os.kill(sidecar.proc.pid, signal.SIGCONT)
        caller.join(120)
        assert answers and not isinstance(answers[0], Exception) and answers[0].status_code == 200, answers
        flow_run_id = answers[0].json()["flowRunId"]
        assert record(sidecar)["unreported"][flow_run_id]["type"] == "COMPLETED", record(sidecar)

        # SIGKILL before the API returns: the server, back, still has the flow run Running.
        sidecar.kill()
        server, _ = start_prefect_server(home, port=port)
        assert flow_run(flow_run_id, url)["state"]["type"] == "RUNNING"

        # The successor reports what its predecessor knew: Completed, not Crashed.
        sidecar.start(PREFECT_API_URL=url)
        sidecar.wait_healthy()
        state = flow_run(flow_run_id, url)["state"]
        assert state["type"] == "COMPLETED", state
        assert "reported by the sidecar's successor" in state["message"], state
        assert record(sidecar)["unreported"] == {}
        assert get(sidecar, "/done").json()["flowRunId"] == flow_run_id  # the kept summary
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def test_an_unreadable_state_in_the_run_record_is_reported_crashed(tmp_path: Path) -> None:
    """A run record whose flow run carries a state this version does not know (another version wrote
    it, or it was damaged) does not stop start-up: that flow run is reported Crashed."""
    from prefect.states import StateType

    from sidecar.orchestration import PrefectApi
    from sidecar.runstate import RunStore

    store = RunStore(tmp_path, "evt-u", "mod")
    store.save(unreported={"run-a": {"type": "NOT_A_STATE", "message": "m"}, "run-b": {"message": "no type"},
                           "run-c": {"type": "COMPLETED", "message": "done"}})
    api = PrefectApi(timeout=1, ledger=store)
    api._inherit()
    assert {run: state.type for run, state in api._inherited.items()} == {
        "run-a": StateType.CRASHED, "run-b": StateType.CRASHED, "run-c": StateType.COMPLETED}
