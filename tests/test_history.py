"""Run history in the Prefect UI (flows/history.py), read back through the Prefect API the UI uses:
tags, parameters, artifacts (capped lists), progress, and how a module's bad input is logged."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi.encoders import jsonable_encoder

from flows import history
from sidecar.dataplane import build_dataplane
from flows.runtime import Runtime
from sidecar.cli import compose_config
from sidecar.layout import ModuleLayout
from testsupport.processes import SECRET, SidecarProcess, dev_args, read_runs


def api(work):
    """Run ``work(client)`` against the session's Prefect server; returns its result."""
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await work(client)

    return asyncio.run(run())


def latest(key: str):
    """The latest artifact stored under ``key`` (one lookup), or None."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    async def read(client):
        found = await client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])))
        return found[0] if found else None

    return api(read)


def flow_runs_tagged(tag: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    return api(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))))


def task_runs_of(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return api(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))


def run_logs(flow_run_id: str) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return api(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def write_outputs(out: Path, files: int, passed_on: list[str]) -> None:
    """``files`` output files, one event passing ``passed_on`` on, and a two-pair insight."""
    (out / "events").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = out / "data" / "batch" / f"f{i:03}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {i:03}\n")  # 9 bytes
    (out / "events" / "1.json").write_text(json.dumps([
        {"key": "eventType", "value": "file_discovered"}, {"key": "files", "value": ",".join(passed_on)},
        {"key": "model", "value": "v2|beta"}]))
    (out / "meta.json").write_text(json.dumps([{"key": "files", "value": str(files)},
                                               {"key": "note", "value": "x" * 500}]))


def test_graph_run_is_tagged_reported_and_a_bad_input_is_one_warning(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from sidecar.api import create_app

    corr = f"corr-hist-{time.time_ns()}"
    many = history.MAX_ROWS + 50
    passed_on = [f"batch/f{i:03}.txt" for i in range(12)]
    # The parent in process (its sidecar's start-up costs seconds), the child as a real process.
    cfg, _ = compose_config([*dev_args("Evt_Parent", corr, "finder"), f"--sharedsecret={SECRET}",
                             f"--basedir={tmp_path / 'ion-parent'}", f"--devdir={tmp_path / '.dev'}"])
    with TestClient(create_app(Runtime.for_config(cfg))) as parent:
        ready = parent.get("/ready", headers={"secret": SECRET}).json()
        write_outputs(tmp_path / "ion-parent" / "out", many, passed_on)
        done = parent.get("/done", headers={"secret": SECRET})
        assert done.status_code == 200, done.text
    child_id = done.json()["events"][0]["eventId"]

    with SidecarProcess(tmp_path, dev_args(child_id, corr, "child", parent="Evt_Parent")) as child:
        child.wait_healthy()
        child_ready = child.get("/ready")
        assert child_ready.status_code == 200, child_ready.text
        (child.basedir / "out" / "events").mkdir(parents=True, exist_ok=True)
        (child.basedir / "out" / "events" / "bad.json").write_text(json.dumps([{"key": "eventType", "value": "nope"}]))
        bad = child.get("/done")
        assert bad.status_code == 400
    stderr = child.log.read_text()

    # Tags: one filter on the correlation shows the whole graph run, each run tagged with its ids.
    runs = {run.name: run for run in flow_runs_tagged(f"correlation:{corr}")}
    assert set(runs) == {"ready-finder-Evt_Parent", "done-finder-Evt_Parent", f"ready-child-{child_id}",
                         f"done-child-{child_id}"}
    assert set(runs["done-finder-Evt_Parent"].tags) == {"module:finder", "event:Evt_Parent", f"correlation:{corr}"}
    assert set(runs[f"ready-child-{child_id}"].tags) == {"module:child", f"event:{child_id}",
                                                         f"correlation:{corr}", "parent:Evt_Parent"}
    assert runs[f"done-child-{child_id}"].state.is_failed()
    # Their task runs carry none: Prefect would acquire a tag concurrency slot through the API before
    # each one starts, a task that cannot start during an outage of the API.
    task_runs = task_runs_of(runs["done-finder-Evt_Parent"].id)
    assert task_runs and all(run.tags == [] for run in task_runs), [run.tags for run in task_runs]

    # Parameters say which module run and which providers, and carry no secret.
    params = runs["ready-finder-Evt_Parent"].parameters["runtime"]
    assert params["module"] == "finder" and params["eventId"] == "Evt_Parent" and params["blobStore"]
    assert SECRET not in json.dumps([r.parameters for r in runs.values()])

    # The parent's /done: every file up to the cap, then one row counting the rest.
    key = history.artifact_key
    files = latest(key("done-files", "finder", "Evt_Parent"))
    assert files.flow_run_id == runs["done-finder-Evt_Parent"].id and files.type == "table"
    rows = json.loads(files.data)
    assert len(rows) == history.MAX_ROWS + 1
    assert rows[0] == {"path": "batch/f000.txt", "bytes": 9, "MD5": "", "blob key": "Evt_Parent/finder/batch/f000.txt"}
    assert rows[-1]["path"] == "… and 50 more files not shown"
    events = json.loads(latest(key("done-events", "finder", "Evt_Parent")).data)
    assert events == [{"event id": child_id, "type": "file_discovered",
                       "destination": f"folder {tmp_path}/.dev/events",
                       "files": ", ".join(passed_on[:10]) + " (+2 more)"}]
    report = latest(key("done", "finder", "Evt_Parent")).data
    assert f"Committed **{many} files, {9 * many:,} bytes**, an insight and **1 child events**" in report
    assert "| files | 150 |" in report and "… (300 more characters)" in report and child_id in report
    assert "| batch/f019.txt | 9 |" in report and "batch/f020.txt" not in report
    assert f"… and 130 more: table artifact `{key('done-files', 'finder', 'Evt_Parent')}` lists 100 of the 150." in report

    # The child's /ready: the staged files and the passed-on pairs, escaped for markdown.
    staged = json.loads(latest(key("ready-files", "child", child_id)).data)
    assert [row["path"] for row in staged] == passed_on
    assert all(row["blob key"] == f"Evt_Parent/finder/{row['path']}" and row["bytes"] == 9 for row in staged)
    ready_report = latest(key("ready", "child", child_id)).data
    assert "Staged **12 files, 108 bytes**" in ready_report and "| model | v2\\|beta |" in ready_report

    # The child's failed /done: its report says why and that nothing was committed.
    failed = latest(key("done", "child", child_id))
    assert failed.flow_run_id == runs[f"done-child-{child_id}"].id
    assert "HTTP 400" in failed.data and "out/events/bad.json: key 'eventType'" in failed.data
    assert "nothing was committed" in failed.data

    # A bad input is one WARNING line naming file and key, without a traceback, on stderr and in the UI.
    warnings = [line for line in stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "out/events/bad.json: key 'eventType'" in warnings[0], stderr
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr
    logs = run_logs(str(runs[f"done-child-{child_id}"].id))
    assert [log.level for log in logs if log.level >= 30] == [30], [(log.level, log.message) for log in logs]
    assert "out/events/bad.json: key 'eventType'" in next(log.message for log in logs if log.level == 30)
    assert not any("Traceback" in log.message for log in logs)

    # Log lines name the task run, as the UI does; task runs show their retry delay as a number of seconds.
    assert "Task run 'get-event-meta' - Finished in state Completed()" in stderr
    assert "Task run 'download-12-files' - Finished in state Completed()" in stderr  # 12 small files: one batch
    _, task_runs = read_runs([ready["flowRunId"], done.json()["flowRunId"]], lambda trs: len(trs) >= 4)
    assert task_runs and all(isinstance(t.empirical_policy.retry_delay, (int, float)) for t in task_runs)


def test_artifact_keys_are_valid_and_distinct() -> None:
    key = history.artifact_key
    assert key("done", "finder", "evt-1") == "done-finder-evt-1"
    odd = [key("done", "Finder", "evt-1"), key("done", "finder", "evt_1"), key("done", "fin der", "évt/1"),
           key("done", "finder", "evt-1")]
    assert len(set(odd)) == 4
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") and not k.startswith("-") for k in odd)


def test_parameters_name_the_run_and_hide_every_secret(tmp_path: Path) -> None:
    secrets = {"sharedsecret": "shared-Secret-1", "azureblobprovider.blobaccountkey": "blob-Key-2",
               "mongodbdocprovider.password": "mongo-Pass-3", "servicebuseventprovider.key": "bus-Key-4"}
    cfg, _ = compose_config([
        "--context.eventid=e1", "--context.correlationid=c1", "--context.name=m", f"--basedir={tmp_path}",
        "--azureblobprovider=true", "--azureblobprovider.blobaccountname=acct",
        "--azureblobprovider.containername=box", "--mongodbdocprovider=true", "--mongodbdocprovider.name=db",
        "--servicebuseventprovider=true", "--servicebuseventprovider.namespace=ns",
        "--servicebuseventprovider.authorizationrulename=rule", "--servicebuseventprovider.topic=ion",
        *(f"--{k}={v}" for k, v in secrets.items()),
    ])
    runtime = Runtime(cfg, ModuleLayout(tmp_path), build_dataplane(cfg))  # the providers describe themselves
    encoded = json.dumps(jsonable_encoder(runtime))  # what Prefect stores
    assert '"module": "m"' in encoded and "container 'box'" in encoded and "topic 'ion'" in encoded
    assert not [s for s in secrets.values() if s in encoded]


def test_progress_only_for_long_transfers_and_at_most_once_per_interval() -> None:
    from prefect import flow

    key_slow, key_fast = f"progress-slow-{time.time_ns()}", f"progress-fast-{time.time_ns()}"

    @flow(persist_result=False)
    async def transfers() -> tuple[history.TransferProgress, float, history.TransferProgress]:
        started = time.monotonic()
        async with history.TransferProgress(key_slow, "uploaded", 10, 1000, after=0.3, every=0.3) as slow:
            for _ in range(10):
                await slow.track(asyncio.sleep(0.12), 100)
        elapsed = time.monotonic() - started
        async with history.TransferProgress(key_fast, "uploaded", 2, 200, after=0.3, every=0.3) as fast:
            for _ in range(2):
                await fast.track(asyncio.sleep(0.01), 100)
        return slow, elapsed, fast

    slow, elapsed, fast = asyncio.run(transfers())
    artifact = latest(key_slow)
    assert artifact.type == "progress" and artifact.data == 100.0
    assert artifact.description == "10 of 10 files, 1,000 of 1,000 bytes uploaded"
    # Created after 0.3 s, then one write per 0.3 s at most, and one at the end.
    assert 2 <= slow.updates <= (elapsed - 0.3) / 0.3 + 2, (slow.updates, elapsed)
    assert fast.updates == 0 and latest(key_fast) is None


def test_bad_input_raised_in_a_task_is_one_warning_for_task_and_flow_runs() -> None:
    import logging

    from sidecar.errors import InputError
    from sidecar.logs import BadInputFilter

    bad = BadInputFilter()
    exc = InputError("out/events/a.json", "not a valid event type", key="eventType")

    def record(logger: str, level: int, msg: str, err: BaseException | None = None, **ids: str) -> logging.LogRecord | None:
        rec = logging.LogRecord(logger, level, __file__, 1, msg, None, (type(err), err, None) if err else None)
        rec.__dict__.update(ids)
        return rec if bad.filter(rec) else None

    task = record("prefect.task_runs", logging.ERROR, "Task run failed with exception", exc, flow_run_id="f", task_run_id="t")
    assert task.levelno == logging.WARNING and task.exc_info is None
    assert task.getMessage() == "bad input, nothing committed: out/events/a.json: key 'eventType': not a valid event type"
    assert record("prefect.task_runs", logging.ERROR, "Finished in state Failed()", flow_run_id="f", task_run_id="t").levelno == logging.INFO
    assert record("prefect.flow_runs", logging.ERROR, "Encountered exception during execution", exc, flow_run_id="f") is None
    assert record("prefect.flow_runs", logging.ERROR, "Finished in state Failed()", flow_run_id="f").levelno == logging.INFO
    # Another run's failure is left as Prefect logs it.
    assert record("prefect.flow_runs", logging.ERROR, "Finished in state Failed()", flow_run_id="g").levelno == logging.ERROR


def test_the_last_progress_write_goes_beside_the_final_state(monkeypatch) -> None:
    """A transfer's last progress write does not hold the flow's next step (it goes beside the final
    state: a /done of 1000 files waited 0.13 s for it), yet a call made through ``PrefectApi.run``
    answers only once it is done, so the artifact reads 100 % when the module hears back."""
    from prefect import flow

    from sidecar.orchestration import PrefectApi

    key = f"progress-tail-{time.time_ns()}"
    order: list[str] = []
    original = history.aupdate_progress_artifact

    async def slow_update(*args, **kwargs):
        # The last write waits for the flow's next step, or 10 s: with the write in the flow's path
        # the step comes after it, and the order says so.
        for _ in range(100):
            if "next step" in order:
                break
            await asyncio.sleep(0.1)
        result = await original(*args, **kwargs)
        order.append("last write")
        return result

    monkeypatch.setattr(history, "aupdate_progress_artifact", slow_update)

    @flow(name="sidecar-progress-tail", persist_result=False)
    async def transfer() -> str:
        async with history.TransferProgress(key, "uploaded", 2, 200, after=0.2, every=5.0) as progress:
            await progress.track(asyncio.sleep(0.5), 100)  # long enough for the artifact to be created
            await progress.track(asyncio.sleep(0), 100)
        order.append("next step")
        return "committed"

    async def call() -> tuple[str, list[str]]:
        api = PrefectApi(timeout=60)
        api.resolve()
        api.start()
        try:
            result = await api.run(transfer)
            return result, list(order)
        finally:
            await api.stop()

    result, answered_after = asyncio.run(call())
    assert result == "committed"
    assert answered_after == ["next step", "last write"], answered_after
    artifact = latest(key)
    assert artifact.type == "progress" and artifact.data == 100.0, artifact
    assert artifact.description == "2 of 2 files, 200 of 200 bytes uploaded"
