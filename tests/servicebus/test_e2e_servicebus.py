"""End to end with events on Service Bus (the AMQP peer standing in for the emulator), blobs and
documents on the development providers: real sidecar processes and real module processes
(examples/module.py), the child started from the message a subscription receiver got, as Ion's
dispatcher would start it."""

from __future__ import annotations

import asyncio

import time
from pathlib import Path

from ion_sidecar_client import SidecarClient
from sidecar.providers.jsonfiles import JsonFileDocumentStore
from testsupport.amqp_peer import AmqpPeer
from testsupport.processes import SECRET, SidecarProcess, dev_args, run_child_of_file2, run_module
from testsupport.servicebus import SilentListener, receive_all_sync, unique

SAS_KEY = "SAS_KEY_VALUE"


def bus_args(event_id: str, correlation_id: str, name: str, connection_string: str, *, parent: str = "",
             types: str = "file_discovered", extra: tuple[str, ...] = ()) -> list[str]:
    """Seed flags: Service Bus events, development blobs and documents (a slot whose provider is not
    enabled uses its development provider)."""
    args = [a for a in dev_args(event_id, correlation_id, name, parent=parent, types=types) if a != "--development=true"]
    return [*args, "--servicebuseventprovider=true", f"--servicebuseventprovider.connectionstring={connection_string}",
            *extra]


def test_parent_then_child_chain_through_a_service_bus_topic(tmp_path: Path, amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("ion-events"), ["child-module"]).name
    cs = amqp_peer.connection_string()
    root = unique("evt-root")
    with SidecarProcess(tmp_path, bus_args(root, "corr-sb", "parent", cs,
                                           extra=(f"--servicebuseventprovider.topic={topic}",))) as parent:
        lines = run_module(parent, EVENT_LABEL="root")
        parent_log = parent.output()
    done = lines[-1]["done"]
    assert done["files"] == 5 and len(done["events"]) == 5
    assert SAS_KEY not in parent_log

    received = receive_all_sync(cs, topic, "child-module")
    assert sorted(r.message_id for r in received) == sorted(e["eventId"] for e in done["events"])
    for message in received:
        assert message.event.context.parentEventId == root and message.correlation_id == "corr-sb"
        assert message.subject == message.event_type == message.event.type == "file_discovered"
        assert message.content_type == "application/json"
    assert not (tmp_path / ".dev" / "events").exists()  # events went to the bus, not to files

    # The dispatcher starts the child from the message: its event id comes from the message body.
    documents = JsonFileDocumentStore(tmp_path / ".dev" / "documents")
    message = next(m for m in received
                   if asyncio.run(documents.get_event_meta(m.event.context.eventId)).files[0].path == "found/file2.txt")
    event = message.event
    child_args = bus_args(event.context.eventId, event.context.correlationId, "child", cs,
                          parent=event.context.parentEventId, extra=(f"--servicebuseventprovider.topic={topic}",))
    run_child_of_file2(tmp_path, child_args)
    [grandchild] = receive_all_sync(cs, topic, "child-module")
    assert grandchild.event.context.parentEventId == event.context.eventId


def test_done_answers_503_while_the_bus_hangs_and_the_retry_publishes_each_event_once(tmp_path: Path) -> None:
    listener = SilentListener()  # the bus is down: it accepts TCP and never answers
    types = [unique("found"), unique("flagged")]
    deadline = 4.0  # bounds the whole publish step, Prefect's task-run bookkeeping included
    extra = (f"--servicebuseventprovider.publishtimeoutseconds={deadline}", "--transfer.retries=1",
             "--transfer.retrydelayseconds=0.1")  # no topic: one topic per event type
    peer = None
    try:
        with SidecarProcess(tmp_path, bus_args(unique("evt"), "corr-retry", "mod", listener.connection_string(),
                                               types=",".join(types), extra=extra)) as sidecar:
            sidecar.wait_healthy()
            module = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
            module.ready()
            for i in range(4):
                module.write_event(f"event{i}", types[i % 2], index=str(i))

            started = time.monotonic()
            failed = sidecar.get("/done")
            elapsed = time.monotonic() - started
            assert failed.status_code == 503, failed.text
            body = failed.json()
            assert body["statusCode"] == 503 and "event bus" in body["message"] and types[0] in body["message"]
            # The deadline bounds the publish step, its task retries included, plus the flow's own work.
            assert deadline <= elapsed < deadline + 30
            assert listener.accepted >= 1 and listener.closed.wait(5)

            listener.close()  # the bus comes back on the same address
            peer = AmqpPeer(listener.port).start()
            for event_type in types:
                peer.create_topic(event_type, ["mod"])
            retried = sidecar.get("/done")
            assert retried.status_code == 200, retried.text
            published = retried.json()["events"]
            assert sidecar.get("/done").json() == retried.json()  # a repeated /done changes nothing

        cs = peer.connection_string()
        for event_type in types:
            got = receive_all_sync(cs, event_type, "mod")
            expected = sorted(e["eventId"] for e in published if e["eventType"] == event_type)
            assert sorted(r.message_id for r in got) == expected and len(expected) == 2
            assert all(r.event.type == event_type for r in got)
        assert all(peer.topics[t].duplicates == 0 for t in types)
    finally:
        listener.close()
        if peer is not None:
            peer.stop()
