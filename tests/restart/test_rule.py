"""The one rule for a sidecar started on a volume that already holds a run's record (README: Restarts):
an open record of the same event id and module name is resumed; no record, another run's record, or a
closed one (a graceful stop after /done) starts a fresh run. In process, development providers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from sidecar.api import create_app
from sidecar.runstate import RunStore
from testsupport.runtime import H, dev_runtime, write_found_outputs


def dev_events(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / ".dev" / "events").glob("*.json"))


def test_sidecar_restarted_after_ready_resumes_and_keeps_the_outputs(tmp_path: Path) -> None:
    first = dev_runtime(tmp_path)
    with TestClient(create_app(first)) as client:
        staged = client.get("/ready", headers=H).json()
        write_found_outputs(first, 3)
    # A new sidecar (same flags, same volume): the stop came before /done, so the run is still open.
    second = dev_runtime(tmp_path)
    with TestClient(create_app(second)) as client:
        assert client.get("/healthz").json()["phase"] in ("new", "ready")
        again = client.get("/ready", headers=H)
        assert again.status_code == 200 and again.json() == staged  # the kept summary; nothing cleared
        assert len(list(second.layout.out_events.iterdir())) == 3
        done = client.get("/done", headers=H)
        assert done.status_code == 200 and done.json()["files"] == 3 and len(done.json()["events"]) == 3


def test_done_without_a_new_ready_after_a_restart(tmp_path: Path) -> None:
    first = dev_runtime(tmp_path)
    with TestClient(create_app(first)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(first, 2)
    second = dev_runtime(tmp_path)
    with TestClient(create_app(second)) as client:
        done = client.get("/done", headers=H)
        assert done.status_code == 200 and len(done.json()["events"]) == 2


def test_events_recorded_as_published_are_not_published_again(tmp_path: Path) -> None:
    first = dev_runtime(tmp_path)
    with TestClient(create_app(first)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(first, 3)
    # As if a killed sidecar had published the events of e0 and e1 and recorded them.
    from flows.runtime import child_event_id

    published = [child_event_id(first.cfg, f"e{i}.json") for i in range(2)]
    first.run.refresh()
    first.run.add_published(published)
    second = dev_runtime(tmp_path)
    with TestClient(create_app(second)) as client:
        done = client.get("/done", headers=H).json()
    assert len(done["events"]) == 3
    assert dev_events(tmp_path) == [f"{child_event_id(first.cfg, 'e2.json')}.json"]  # only the unrecorded one
    assert json.loads(second.run.path.read_text())["published"] == published + [child_event_id(first.cfg, "e2.json")]


def test_dev_rerun_after_a_graceful_stop_is_a_fresh_run(tmp_path: Path) -> None:
    """`scripts/dev` twice with the same ids: the first sidecar stopped (Ctrl-C) after /done."""
    first = dev_runtime(tmp_path)
    with TestClient(create_app(first)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(first, 2)
        before = client.get("/done", headers=H).json()
    assert json.loads(first.run.path.read_text())["closed"] is True
    shutil.rmtree(tmp_path / ".dev" / "events")
    second = dev_runtime(tmp_path)
    with TestClient(create_app(second)) as client:
        staged = client.get("/ready", headers=H)
        assert staged.status_code == 200
        assert list(second.layout.out_data.iterdir()) == []  # a fresh run starts from clean folders
        write_found_outputs(second, 1)
        after = client.get("/done", headers=H).json()
    assert after["flowRunId"] != before["flowRunId"] and after["files"] == 1
    assert len(dev_events(tmp_path)) == 1  # published again: the author sees the new run's events


def test_module_deleting_its_base_folder_gets_a_fresh_run(tmp_path: Path) -> None:
    """Ion's example module deletes its base folder before /ready: that deletes the record too."""
    runtime = dev_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        first = client.get("/ready", headers=H).json()
        write_found_outputs(runtime, 2)
        shutil.rmtree(runtime.layout.basedir)
        second = client.get("/ready", headers=H)
        assert second.status_code == 200 and second.json()["flowRunId"] != first["flowRunId"]
        assert runtime.layout.in_meta.exists()  # staged again
        write_found_outputs(runtime, 1)
        assert client.get("/done", headers=H).json()["files"] == 1


def test_another_run_on_a_reused_volume_gets_clean_folders(tmp_path: Path) -> None:
    first = dev_runtime(tmp_path)
    with TestClient(create_app(first)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(first, 2)  # never committed: the run stays open
    other = dev_runtime(tmp_path, "--context.eventid=evt-other")
    with TestClient(create_app(other)) as client:
        assert client.get("/done", headers=H).status_code == 409  # not this run's record
        assert client.get("/ready", headers=H).status_code == 200
        assert list(other.layout.out_data.iterdir()) == [] and list(other.layout.out_events.iterdir()) == []
    record = json.loads(other.run.path.read_text())
    assert record["eventId"] == "evt-other" and record["phase"] == "ready"


def test_the_record_lives_beside_in_and_out_and_is_written_atomically(tmp_path: Path) -> None:
    runtime = dev_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
    base = runtime.layout.basedir
    assert runtime.run.path == base / ".sidecar" / "run.json"
    assert sorted(p.name for p in base.iterdir()) == [".sidecar", "in", "out"]
    assert [p.name for p in runtime.run.path.parent.iterdir()] == ["run.json"]  # no temp file left
    # An unreadable record (not one this code writes) is ignored: a fresh run.
    runtime.run.path.write_text("{not json")
    assert RunStore(base, "evt-api", "mod").refresh().phase == "new"
