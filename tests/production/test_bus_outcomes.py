"""What a publish to Service Bus leaves behind when its outcome is not known, and names the bus refuses.

Each real provider on its local peer (Azurite, nx-27017, the AMQP 1.0 peer: ``tests/production``'s
stack, the bus behind the fault proxy), the session's Prefect server and the sidecar's app in this
process.

- An ambiguous publish: the proxy holds the transfer carrying the events (``hang_when``) past
  ``publishtimeoutseconds``, then lets it through: the broker has the events while the first ``/done``
  answered 503. The answer and the run record say the events may have been delivered; the retried
  ``/done`` sends them again under the same message ids, which a topic with duplicate detection drops
  (each delivered once) and a topic without it delivers twice (the window the README states; before,
  nothing recorded or said it).
- A per-event-type topic that does not exist is named "not found" (it was a ``ServiceBusAuthenticationError
  ... amqp:client-error``), and an event type that cannot name a topic is refused before anything is
  committed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from flows.history import artifact_key
from flows.runtime import Runtime, child_event_id
from sidecar.api import create_app
from sidecar.cli import compose_config
from testsupport.processes import SECRET
from testsupport.servicebus import receive_all_sync, unique
from testsupport.stack import Stack, seed_args

H = {"secret": SECRET}
BUS_DEADLINE = 3.0  # --servicebuseventprovider.publishtimeoutseconds, seconds


def runtime_for(stack: Stack, root: Path, event_id: str, topic: str, types: str = "file_discovered",
                bypass_topic: str | None = None) -> Runtime:
    """An in-process sidecar on ``stack`` publishing to ``topic``; ``bypass_topic`` replaces the topic
    setting after the start-up checks (to reach the plan's own check)."""
    args = [a for a in seed_args(stack, event_id, "corr-" + event_id, "mod") if not a.startswith(
        ("--valideventtypes", "--servicebuseventprovider.topic"))]
    cfg, _ = compose_config(args + [
        f"--valideventtypes={types}", f"--servicebuseventprovider.topic={topic}",
        f"--sharedsecret={SECRET}", f"--basedir={root / event_id}", f"--devdir={root / '.dev'}",
        "--transfer.retries=1", "--transfer.retrydelayseconds=0.1",
        "--mongodbdocprovider.serverselectiontimeoutseconds=2", "--mongodbdocprovider.sockettimeoutseconds=5",
        f"--servicebuseventprovider.publishtimeoutseconds={BUS_DEADLINE}",
    ])
    if bypass_topic is not None:
        cfg.servicebuseventprovider.topic = bypass_topic
    return Runtime.for_config(cfg)


def write_outputs(base: Path, event_type: str = "file_discovered", n: int = 2) -> None:
    out = base / "out"
    (out / "events").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (out / "data" / f"f{i}.txt").write_bytes(f"content {i}".encode() * 100)
        (out / "events" / f"e{i}.json").write_text(json.dumps(
            [{"key": "eventType", "value": event_type}, {"key": "files", "value": f"f{i}.txt"}]))
    (out / "meta.json").write_text(json.dumps([{"key": "k", "value": "v"}]))


def record(runtime: Runtime) -> dict:
    return json.loads((runtime.layout.basedir / ".sidecar" / "run.json").read_text())


def committed(stack: Stack, event_id: str) -> tuple[int, int, int]:
    """Blobs, event metas and insights of ``event_id`` in the data plane (read directly)."""
    metas = [d for d in stack.documents() if d.get("parentEventId") == event_id]
    insights = [d for d in stack.documents("_insights") if d.get("eventId") == event_id]
    return len(stack.blobs(f"{event_id}/")), len(metas), len(insights)


@pytest.mark.parametrize("detection", [True, False], ids=["duplicate-detection", "no-duplicate-detection"])
def test_a_publish_past_its_deadline_that_reached_the_broker_is_recorded_and_resent(
        tmp_path: Path, stack: Stack, detection: bool, caplog: pytest.LogCaptureFixture) -> None:
    topic = stack.peer.create_topic(unique("ambiguous"), ["s"], duplicate_detection=detection)
    event_id = unique("amb")
    runtime = runtime_for(stack, tmp_path, event_id, topic.name)
    ids = sorted(child_event_id(runtime.cfg, f"e{i}.json") for i in range(2))
    try:
        with TestClient(create_app(runtime)) as client:
            assert client.get("/ready", headers=H).status_code == 200
            write_outputs(runtime.layout.basedir)
            # Hold the transfer carrying the events (their JSON), after the link was attached.
            stack.bus_proxy.hang_when(b"previousStages", forward=False)
            first = client.get("/done", headers=H)
            assert stack.bus_proxy.triggered.is_set()  # the transfer really was held
            assert first.status_code == 503, first.text
            message = first.json()["message"]
            assert f"did not finish within {BUS_DEADLINE:g} s" in message
            assert "2 of these events may have been delivered" in message, message
            kept = record(runtime)
            assert kept["published"] == [] and kept["sending"] == [] and sorted(kept["uncertain"]) == ids

            stack.bus_proxy.up(resume=True)  # the held transfer reaches the broker after all
            deadline = time.monotonic() + 30
            while len(topic.seen_ids) < 2:
                assert time.monotonic() < deadline, "the held transfer never reached the peer"
                time.sleep(0.1)

            caplog.set_level(logging.WARNING, logger="flows.done")
            retry = client.get("/done", headers=H)
            assert retry.status_code == 200, retry.text
    finally:
        stack.up()
    [resend] = [r.getMessage() for r in caplog.records if r.name == "flows.done"]
    assert resend.startswith("publishing 2 child events again after an earlier publish of them ended without")
    assert all(i in resend for i in ids)
    kept = record(runtime)
    assert sorted(kept["published"]) == ids and kept["sending"] == [] and sorted(kept["uncertain"]) == ids
    # The run history's /done report says so.
    report = httpx.post(f"{os.environ['PREFECT_API_URL'].rstrip('/')}/artifacts/filter", timeout=10, json={
        "artifacts": {"flow_run_id": {"any_": [retry.json()["flowRunId"]]},
                      "key": {"any_": [artifact_key("done", "mod", event_id)]}}}).json()
    assert len(report) == 1 and "**2 child events may have been delivered twice**" in report[0]["data"]
    assert all(f"`{i}`" in report[0]["data"] for i in ids)
    assert topic.duplicates == 2  # the resend reached the broker, under the same message ids
    delivered = collections.Counter(m.message_id for m in receive_all_sync(
        stack.bus_connection_string(direct=True), topic.name, "s"))
    assert delivered == {i: 1 if detection else 2 for i in ids}
    assert committed(stack, event_id) == (2, 2, 1)


def test_sends_a_killed_sidecar_left_unanswered_are_recorded_as_maybe_delivered(tmp_path: Path, stack: Stack) -> None:
    topic = stack.peer.create_topic(unique("killed"), ["s"])
    event_id = unique("kill")
    runtime = runtime_for(stack, tmp_path, event_id, topic.name)
    ids = sorted(child_event_id(runtime.cfg, f"e{i}.json") for i in range(2))
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_outputs(runtime.layout.basedir)
        # What a predecessor killed between handing a batch to the bus and its answer leaves on the volume.
        runtime.run.add_sending(ids)
        assert record(runtime)["sending"] == ids
        done = client.get("/done", headers=H)
        assert done.status_code == 200, done.text
    kept = record(runtime)
    assert sorted(kept["published"]) == ids and kept["sending"] == [] and kept["uncertain"] == ids
    assert sorted(m.message_id for m in receive_all_sync(stack.bus_connection_string(direct=True), topic.name, "s")) == ids


@pytest.mark.parametrize("where", ["put-token", "link-attach"])
def test_a_per_type_topic_that_does_not_exist_is_named_not_found(tmp_path: Path, stack: Stack, where: str) -> None:
    # Service Bus refuses a missing entity at the put-token (404) or, for one deleted after the token was
    # put, at the link attach (amqp:not-found); the SDK raised ServiceBusAuthenticationError
    # "amqp:client-error" for the first and ServiceBusConnectionError "amqp:unknown-error" for the second.
    event_type = unique("no-such-topic")
    event_id = unique("nf")
    runtime = runtime_for(stack, tmp_path, event_id, "{eventType}", types=event_type)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_outputs(runtime.layout.basedir, event_type)
        stack.peer.token_entity_check = where == "put-token"
        try:
            missing = client.get("/done", headers=H)
        finally:
            stack.peer.token_entity_check = True
        assert missing.status_code == 502, missing.text
        message = missing.json()["message"]
        answer = "404 The messaging entity" if where == "put-token" else "amqp:not-found no messaging entity at"
        assert f"topic '{event_type}' was not found: Service Bus answered {answer}" in message, message
        assert "Authentication" not in message and "client-error" not in message and "unknown-error" not in message
        assert record(runtime)["uncertain"] == []  # refused for good: nothing may have been delivered
        stack.peer.create_topic(event_type, ["s"])
        assert client.get("/done", headers=H).status_code == 200
    assert len(receive_all_sync(stack.bus_connection_string(direct=True), event_type, "s")) == 2


@pytest.mark.parametrize("mode", ["dev", "real"])
def test_the_plan_refuses_an_event_type_that_cannot_name_its_topic_before_committing(
        tmp_path: Path, stack: Stack, mode: str) -> None:
    # Start-up refuses such a type (tests/test_settings_guards.py); a config that bypassed that check
    # (the topic changed after it) still gets a 400 from the plan, in development mode and with the real
    # bus alike, where the real providers answered 502 after committing 2 blobs, 2 event metas and an insight.
    bad = "file discovered#1"
    event_id = unique(f"inv-{mode}")
    if mode == "real":
        runtime = runtime_for(stack, tmp_path, event_id, "one-topic", types=bad, bypass_topic="{eventType}")
    else:
        cfg, _ = compose_config([
            "--development=true", f"--context.eventid={event_id}", "--context.correlationid=c", "--context.name=mod",
            f"--valideventtypes={bad}", "--servicebuseventprovider.topic=one-topic", f"--sharedsecret={SECRET}",
            f"--basedir={tmp_path / event_id}", f"--devdir={tmp_path / '.dev'}"])
        cfg.servicebuseventprovider.topic = ""
        runtime = Runtime.for_config(cfg)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_outputs(runtime.layout.basedir, bad)
        refused = client.get("/done", headers=H)
    assert refused.status_code == 400, refused.text
    message = refused.json()["message"]
    assert message.startswith("out/events/e0.json: key 'eventType': event type 'file discovered#1' holds ' ', '#'")
    assert "out/events/e1.json" in message
    if mode == "real":
        assert committed(stack, event_id) == (0, 0, 0)
    else:
        dev = tmp_path / ".dev"
        assert not list(dev.glob("blobs/**/*.txt")) and not (dev / "events").exists()
        assert not list(dev.glob("documents/**/*.json"))


def test_start_up_says_once_when_it_cannot_tell_whether_a_resend_is_dropped(
        tmp_path: Path, stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    # The peer speaks no management API (as a Send-only rule is refused it): start-up goes on and one
    # WARNING says what a retry after an ambiguous publish may do.
    caplog.set_level(logging.INFO, logger="sidecar.providers.servicebus.publisher")
    runtime = runtime_for(stack, tmp_path, unique("dd"), stack.topic)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        deadline = time.monotonic() + 30
        while not [r for r in caplog.records if "duplicate detection" in r.getMessage()]:
            assert time.monotonic() < deadline, "no word on duplicate detection"
            time.sleep(0.1)
    said = [r for r in caplog.records if "duplicate detection" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    text = said[0].getMessage()
    assert text.startswith(f"could not read whether topic {stack.topic} has duplicate detection (")
    assert "delivers those events twice; consumers dedupe on the message id" in text
    assert "SAS_KEY_VALUE" not in text


def test_a_connection_lost_after_the_transfer_went_out_is_recorded_as_maybe_delivered(
        tmp_path: Path, stack: Stack) -> None:
    # The transfer reaches the broker, its disposition never comes back: the connection is cut.
    topic = stack.peer.create_topic(unique("lost"), ["s"])
    event_id = unique("lost")
    runtime = runtime_for(stack, tmp_path, event_id, topic.name)
    ids = sorted(child_event_id(runtime.cfg, f"e{i}.json") for i in range(2))
    try:
        with TestClient(create_app(runtime)) as client, ThreadPoolExecutor(1) as pool:
            assert client.get("/ready", headers=H).status_code == 200
            write_outputs(runtime.layout.basedir)
            stack.bus_proxy.hang_when(b"previousStages", forward=True)
            pending = pool.submit(client.get, "/done", headers=H)
            assert stack.bus_proxy.triggered.wait(60), "the transfer never went out"
            deadline = time.monotonic() + 30
            while len(topic.seen_ids) < 2:  # the broker has both events
                assert time.monotonic() < deadline, "the transfer never reached the peer"
                time.sleep(0.05)
            stack.bus_proxy.down()  # the answer is lost with the connection; the task's retry is refused
            failed = pending.result(120)
            assert failed.status_code == 503, failed.text
            assert "2 of these events may have been delivered" in failed.json()["message"], failed.text
            assert sorted(record(runtime)["uncertain"]) == ids
            stack.bus_proxy.up()
            assert client.get("/done", headers=H).status_code == 200
    finally:
        stack.up()
    assert topic.duplicates == 2  # resent under the same message ids, and dropped
    assert sorted(m.message_id for m in receive_all_sync(stack.bus_connection_string(direct=True), topic.name, "s")) == ids
