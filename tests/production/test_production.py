"""The production path, proven with the real local peers: Azure Blob (Azurite), MongoDB (nx-27017) and
Service Bus (the AMQP 1.0 test peer) at once, with the session's Prefect server.

- the end-to-end chain started with the seed's flags, its flow and task runs read back from Prefect;
- fault injection: each service cut before, during and after its step of /done, then brought back and
  /done retried: in the end every blob, document and message exists exactly once, and no child event
  was ever published whose meta or files were missing;
- (a soak of back-to-back module runs is in test_soak.py, its own file so the suite's workers share the load).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flows.runtime import Runtime, blob_key
from sidecar.api import create_app
from testsupport.azurite import ACCOUNT_KEY
from testsupport.processes import SECRET, SidecarProcess, read_runs, run_child_of_file2, run_module
from testsupport.runtime import write_module_outputs
from testsupport.stack import BUS_KEY, MONGO_PASSWORD, Stack, seed_args, stack_runtime

H = {"secret": SECRET}


def test_chain_with_every_real_provider(tmp_path: Path, stack: Stack) -> None:
    logfile = tmp_path / "parent.log"
    with SidecarProcess(tmp_path, seed_args(stack, "prod-root", "prod-corr", "parent")
                        + [f"--logfile={logfile}"]) as parent:
        lines = run_module(parent, EVENT_LABEL="root")
        parent_output = parent.output()
    ready, done = lines[0]["ready"], lines[-1]["done"]
    assert done["files"] == 5 and len(done["events"]) == 5
    assert not (tmp_path / ".dev").exists()  # nothing fell back to a development provider

    messages = stack.received()
    assert sorted(m.message_id for m in messages) == sorted(e["eventId"] for e in done["events"])
    metas = {m["_id"]: m for m in stack.documents()}
    blobs = stack.blobs("prod-root/parent/")
    for message in messages:
        meta = metas[message.event.context.eventId]
        assert all(f["key"] in blobs for f in meta["files"])
    assert len(stack.documents("_insights")) == 1

    # The dispatcher starts the child from the message whose event carries found/file2.txt.
    event = next(m.event for m in messages if metas[m.event.context.eventId]["files"][0]["path"] == "found/file2.txt")
    child_args = seed_args(stack, event.context.eventId, event.context.correlationId, "child", event.context.parentEventId)
    run_child_of_file2(tmp_path, child_args)
    [grandchild] = stack.received()
    assert grandchild.event.context.parentEventId == event.context.eventId

    # Run history: the parent's flow runs and their task runs, as the Prefect UI shows them.
    required = {"get-event-meta", "publish-5-events", "upsert-5-event-metas", "upsert-insight"}

    def settled(runs: list) -> bool:
        names = {t.name for t in runs}
        return required <= names and any(n.startswith("upload-") for n in names) \
            and all(t.state.is_completed() for t in runs)

    flow_runs, task_runs = read_runs([ready["flowRunId"], done["flowRunId"]], settled)
    assert [r.name for r in flow_runs] == ["ready-parent-prod-root", "done-parent-prod-root"]
    assert all(r.state.is_completed() for r in flow_runs)
    names = sorted(t.name for t in task_runs)
    assert "get-event-meta" in names and "publish-5-events" in names and "upsert-5-event-metas" in names
    assert "upsert-insight" in names and any(n.startswith("upload-") for n in names)

    # No secret in any log line, the log file, or the flow runs' stored parameters.
    text = parent_output + logfile.read_text()
    assert "prod-root" in text
    for secret in (SECRET, ACCOUNT_KEY, MONGO_PASSWORD, BUS_KEY):
        assert secret not in text
        assert all(secret not in json.dumps(r.parameters) for r in flow_runs)


class Watch:
    """Wraps a runtime's providers: checks, at the moment of each publish, that every event's meta and
    files are already in the data plane, and runs fault hooks at step boundaries."""

    def __init__(self, runtime: Runtime, stack: Stack):
        self.runtime, self.stack = runtime, stack
        self.violations: list[str] = []
        self.hooks: dict[str, callable] = {}
        plane = runtime.dataplane
        documents, events = plane.documents, plane.events
        original_insight, original_publish = documents.upsert_insight, events.publish

        def upsert_insight(insight):
            self.hooks.pop("before documents", lambda: None)()
            return original_insight(insight)

        async def publish(batch, **options):
            self.hooks.pop("before events", lambda: None)()
            metas = {m["_id"]: m for m in stack.documents()}
            blobs = set(stack.blobs())
            for event in batch:
                meta = metas.get(event.id)
                if meta is None or any(f["key"] not in blobs for f in meta["files"]):
                    self.violations.append(event.id)
            await original_publish(batch, **options)
            self.hooks.pop("after events", lambda: None)()

        documents.upsert_insight = upsert_insight
        events.publish = publish


FILES, SIZE = 5, 64 * 1024
# (service, point, how): where the service is cut during /done.
TRIALS = [
    ("blob store", "before", None), ("blob store", "during", FILES * SIZE // 3),
    ("blob store", "during", FILES * SIZE * 2 // 3), ("blob store", "after", "before documents"),
    ("document store", "before", None), ("document store", "during", 300), ("document store", "during", 3000),
    ("document store", "after", "before events"),
    ("event bus", "before", None), ("event bus", "during", 1500), ("event bus", "during", 3500),
    ("event bus", "after", "after events"),
]
TALLY: dict[str, int] = collections.Counter()


@pytest.mark.parametrize("service, point, how", TRIALS, ids=[f"{s}-{p}-{h}" for s, p, h in TRIALS])
def test_fault_injection_loses_and_duplicates_nothing(tmp_path: Path, stack: Stack, service: str, point: str, how) -> None:
    event_id = f"fault-{service.split()[0]}-{point}-{how}".replace(" ", "-")
    runtime = stack_runtime(stack, tmp_path, event_id)
    watch = Watch(runtime, stack)
    proxy = stack.proxies[service]
    duplicates_before = stack.peer.topics[stack.topic].duplicates
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_module_outputs(runtime.layout.basedir, FILES, SIZE, event_id)
        if point == "before":
            proxy.down()
        elif point == "during":
            proxy.down_after(how)
        else:
            watch.hooks[how] = proxy.down
        first = client.get("/done", headers=H)
        if point == "after":
            # The service is no longer needed once its step is done: /done succeeds or fails cleanly.
            assert first.status_code in (200, 503), first.text
        elif first.status_code != 200:
            assert first.status_code in (502, 503) and service in first.json()["message"], first.text
        stack.up()
        answer = first
        for _ in range(3):
            if answer.status_code == 200:
                break
            answer = client.get("/done", headers=H)
        assert answer.status_code == 200, answer.text
        child_ids = sorted(e["eventId"] for e in answer.json()["events"])

    prefix = f"{event_id}/mod/"
    blobs = stack.blobs(prefix)
    expected = {blob_key(runtime.cfg, f"out{i}/file{i}.bin") for i in range(FILES)}
    lost_blobs = len(expected - set(blobs))
    extra_blobs = len(set(blobs) - expected)
    metas = collections.Counter(m["eventId"] for m in stack.documents() if m["parentEventId"] == event_id)
    insights = [d for d in stack.documents("_insights") if d["eventId"] == event_id]
    delivered = collections.Counter(m.message_id for m in stack.received())
    lost = lost_blobs + sum(1 for i in child_ids if metas[i] == 0) + sum(1 for i in child_ids if delivered[i] == 0)
    duplicated = extra_blobs + sum(n - 1 for n in metas.values() if n > 1) + max(0, len(insights) - 1) \
        + sum(n - 1 for n in delivered.values() if n > 1)
    republished = stack.peer.topics[stack.topic].duplicates - duplicates_before
    TALLY.update(trials=1, lost=lost, duplicated=duplicated, republished=republished,
                 first_failed=int(first.status_code != 200))
    print(f"\n{service} {point} {how}: first /done {first.status_code}, lost {lost}, duplicated {duplicated}, "
          f"re-published (dropped by duplicate detection) {republished}; totals {dict(TALLY)}")
    assert not watch.violations, f"published before its meta or files were stored: {watch.violations}"
    assert lost == 0 and duplicated == 0
    assert len(insights) == 1 and set(delivered) == set(child_ids)
    assert all(blobs[k].startswith(f"{event_id}:".encode()) for k in blobs)
