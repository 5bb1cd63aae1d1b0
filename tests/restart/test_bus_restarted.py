"""The event bus itself stopped and started again on the same port while /done publishes in several
batches: the answer is honest (503, retryable, while not every event was accepted), the module's retry
delivers every child event, and an event is delivered twice only when the run record lists it as
"may have been delivered" (README: The one window left).

Real processes and peers: a ``python -m sidecar`` frozen at a crash point (``sidecar/crashpoints.py``)
while the bus goes away; Azurite and nx-27017 from the stack; an AMQP 1.0 peer of this module's own
(``testsupport.amqp_peer``), with small messages so that a publish takes several batches and duplicate
detection off so that every delivery counts. A stopped peer closes every connection; the one started
again on the same port keeps the topics and what they hold, as a broker's storage outlives its process.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from ion_sidecar_client import SidecarClient
from testsupport.amqp_peer import AmqpPeer, Topic
from testsupport.processes import RestartableSidecar, free_port
from testsupport.restart import call_in_background, record, started_and_staged
from testsupport.servicebus import receive_all_sync, unique
from testsupport.stack import Stack, seed_args

EVENTS = 9
MAX_MESSAGE = 1200  # bytes: a few events per batch
pytestmark = pytest.mark.timeout(300)


class BrokerKilled(Exception):
    """Raised inside the peer's reactor: its thread ends there, as the process would."""


class Bus:
    """The module's own AMQP peer, which a test stops and starts again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.peer = AmqpPeer(self.port, max_message_size=MAX_MESSAGE).start()
        self.topic = self.peer.create_topic(unique("restarted"), ["next"], duplicate_detection=False)
        self.delivered: collections.Counter[str] = collections.Counter()

    def stop(self) -> None:
        """As a killed broker process: the listener closed and every connection ended by the kernel (FIN).

        ``AmqpPeer.stop`` ends its reactor thread but leaves the accepted sockets open (ESTABLISHED, no
        byte ever again): what a hung broker looks like, not a killed one. Here each is shut down."""
        self.peer.stop()
        assert not self.peer._thread.is_alive(), "the peer did not stop"
        mine = [c for c in psutil.Process().net_connections("tcp") if c.laddr and c.laddr.port == self.port]
        ends = [c for c in mine if c.status == psutil.CONN_ESTABLISHED]
        for conn in ends:
            with socket.socket(fileno=os.dup(conn.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        # Each socket (the listener too) closed in place: its descriptor now holds /dev/null, which the dead
        # reactor's objects may close later without ever closing a descriptor reused by someone else.
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            for conn in mine:
                os.dup2(null, conn.fd)
        finally:
            os.close(null)
        self.killed = len(ends)

    def die_on_transfer(self, n: int) -> None:
        """Make the broker die the moment it has stored the ``n``-th transfer to a topic, before it
        answers it (its disposition never goes out): the publish's outcome is unknown to the sender."""
        broker = self.peer._broker
        original, seen = broker._incoming, [0]

        def incoming(link, payload):
            outcome = original(link, payload)
            if isinstance(link.entity, Topic):
                seen[0] += 1
                if seen[0] == n:
                    raise BrokerKilled(f"killed after storing transfer {n}")
            return outcome

        broker._incoming = incoming

    def start(self) -> None:
        topics = self.peer.topics
        self.peer = AmqpPeer(self.port, max_message_size=MAX_MESSAGE)
        self.peer.topics = topics  # what the broker accepted survives its restart
        self.peer.start()

    def connection_string(self) -> str:
        return self.peer.connection_string()

    def receive(self, parent: str) -> collections.Counter[str]:
        for message in receive_all_sync(self.connection_string(), self.topic.name, "next"):
            if message.event.context.parentEventId == parent:
                self.delivered[message.message_id] += 1
        return self.delivered


@pytest.fixture
def bus() -> Iterator[Bus]:
    bus = Bus()
    yield bus
    bus.stop()


def start_sidecar(tmp_path: Path, stack: Stack, bus: Bus, sidecars: list, pause_at: str,
                  *extra: str) -> tuple[RestartableSidecar, SidecarClient, str]:
    event_id = unique("busrestart")
    args = [a for a in seed_args(stack, event_id, f"corr-{event_id}", "mod")
            if not a.startswith(("--servicebuseventprovider.topic", "--servicebuseventprovider.connectionstring"))]
    args += [f"--servicebuseventprovider.topic={bus.topic.name}",
             f"--servicebuseventprovider.connectionstring={bus.connection_string()}",
             f"--devdir={tmp_path / '.dev'}", "--transfer.retrydelayseconds=0.5", *extra]
    sidecar, client = started_and_staged(tmp_path, sidecars, args, pause_at)
    for i in range(EVENTS):
        client.write_file(f"f{i}.txt", f"{i}".encode() * 100)
        client.write_event(f"e{i}", "file_discovered", [f"f{i}.txt"], index=str(i))
    return sidecar, client, event_id


def test_bus_restarted_between_batches_delivers_each_event_once(tmp_path: Path, stack: Stack, bus: Bus,
                                                                 sidecars: list) -> None:
    """Frozen right after the bus accepted the first batch; the bus stops (every connection closed) and
    is started again on the same port before the sidecar goes on: the next batches fail on the closed
    connection, the task retries on a new one. Each event once; none was ever in doubt."""
    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "accepted#1")
    caller, answers = call_in_background(sidecar)
    sidecar.wait_paused()
    first_ids = set(bus.topic.seen_ids)
    first = len(first_ids)
    assert 0 < first < EVENTS, f"the first batch held {first} of {EVENTS} events"  # several batches
    bus.stop()  # the fault: the broker goes away between two batches ...
    assert bus.killed >= 1, "the sidecar had no connection to the bus"
    bus.start()  # ... and comes back on the same port
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    caller.join(120)
    [answer] = answers
    assert isinstance(answer, httpx.Response), answer
    if answer.status_code != 200:
        assert answer.status_code == 503, answer.text
        done = client.done(retry_seconds=60)
    else:
        done = answer.json()
    delivered = bus.receive(event_id)
    ids = {e["eventId"] for e in done["events"]}
    assert len(ids) == EVENTS and set(delivered) == ids, (done, dict(delivered))
    twice = {i for i, n in delivered.items() if n > 1}
    print(f"\nfirst batch {first}; answer {answer.status_code}; transfers {bus.topic.transfers}; "
          f"deliveries of an id seen before {bus.topic.duplicates}; uncertain {len(record(sidecar)['uncertain'])}")
    assert all(delivered[i] == 1 for i in first_ids), f"the batch accepted before the restart went out again: {dict(delivered)}"
    assert twice <= set(record(sidecar)["uncertain"]), \
        f"delivered twice though never in doubt: {sorted(twice)}; record {record(sidecar)}; transfers {bus.topic.transfers}"
    assert sidecar.stop() == 0


def test_bus_down_between_batches_answers_503_and_the_retry_delivers_the_rest_once(
        tmp_path: Path, stack: Stack, bus: Bus, sidecars: list) -> None:
    """Frozen right after the bus accepted the first batch; the bus goes away and stays away while the
    sidecar goes on: /done answers 503 (not every event was accepted), retryable, naming the event bus.
    The bus comes back; the module's retry delivers the rest, and the first batch is not sent again."""
    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "accepted#1", "--transfer.retries=1")
    caller, answers = call_in_background(sidecar)
    sidecar.wait_paused()
    first_ids = set(bus.topic.seen_ids)
    assert 0 < len(first_ids) < EVENTS
    bus.stop()
    assert bus.killed >= 1, "the sidecar had no connection to the bus"
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    caller.join(120)
    [answer] = answers
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    assert answer.json()["message"].startswith("event bus unavailable"), answer.text
    kept = record(sidecar)
    assert set(kept["published"]) == first_ids and kept["phase"] == "ready", kept
    bus.start()
    done = client.done(retry_seconds=60)
    delivered = bus.receive(event_id)
    ids = {e["eventId"] for e in done["events"]}
    assert len(ids) == EVENTS and set(delivered) == ids, (done, dict(delivered))
    assert all(delivered[i] == 1 for i in first_ids), dict(delivered)
    twice = {i for i, n in delivered.items() if n > 1}
    assert twice <= set(record(sidecar)["uncertain"]), (sorted(twice), record(sidecar))
    assert sidecar.stop() == 0


def test_bus_killed_after_storing_a_batch_unanswered_is_said_and_only_that_batch_repeats(
        tmp_path: Path, stack: Stack, bus: Bus, sidecars: list) -> None:
    """The broker dies after it stored the second batch and before it answered: the 503 says those events
    may have been delivered, the record lists exactly them as uncertain, and after the bus is back the
    retry delivers every event, with only that batch twice (the documented window)."""
    bus.die_on_transfer(2)
    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "", "--transfer.retries=1")
    caller, answers = call_in_background(sidecar)
    deadline = time.monotonic() + 60
    while bus.peer._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not bus.peer._thread.is_alive(), "the broker never died"
    stored = list(bus.topic.seen_ids)  # what the broker holds: batches 1 and 2
    bus.stop()
    caller.join(120)
    [answer] = answers
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    kept = record(sidecar)
    second = set(stored) - set(kept["published"])
    assert second and len(kept["published"]) + len(second) == len(stored), (stored, kept)
    assert set(kept["uncertain"]) == second, kept
    assert f"{len(second)} of these events may have been delivered" in answer.json()["message"], answer.text
    bus.start()
    done = client.done(retry_seconds=60)
    delivered = bus.receive(event_id)
    ids = {e["eventId"] for e in done["events"]}
    assert len(ids) == EVENTS and set(delivered) == ids, (done, dict(delivered))
    assert {i for i, n in delivered.items() if n > 1} == second, dict(delivered)
    assert sidecar.stop() == 0


def test_an_event_edited_after_a_partial_publish_is_refused_and_nothing_is_sent_again(
        tmp_path: Path, stack: Stack, bus: Bus, sidecars: list) -> None:
    """The first batch went out, the bus went away (503); the module rewrites an event file before it
    retries: the retry (the same sidecar) answers 409 naming the file, and neither the event meta a
    child may have read nor any delivery changes (README: Restarts)."""
    from ion_sidecar_client import COMMITTED_ALREADY, SidecarCallError

    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "accepted#1", "--transfer.retries=0")
    caller, answers = call_in_background(sidecar)
    sidecar.wait_paused()
    first_ids = set(bus.topic.seen_ids)
    bus.stop()
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    caller.join(120)
    [answer] = answers
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    metas = {m["eventId"]: m for m in stack.documents() if m["parentEventId"] == event_id}
    bus.start()
    client.write_event("e0", "file_discovered", ["f0.txt"], index="rewritten")
    with pytest.raises(SidecarCallError) as refused:
        client.done(retry_seconds=30)
    assert refused.value.status_code == 409 and COMMITTED_ALREADY in refused.value.body, refused.value.body
    assert "out/events/e0.json" in refused.value.body, refused.value.body
    assert {m["eventId"]: m for m in stack.documents() if m["parentEventId"] == event_id} == metas
    delivered = bus.receive(event_id)
    assert set(delivered) == first_ids and all(n == 1 for n in delivered.values()), dict(delivered)
    assert sidecar.stop() == 0


def test_sigterm_between_batches_then_restart_delivers_each_event_once(tmp_path: Path, stack: Stack, bus: Bus,
                                                                       sidecars: list) -> None:
    """SIGTERM (a graceful stop) lands right after the bus accepted the first of several batches: the
    stopped call is answered 503, the successor publishes the rest, and no event goes out twice."""
    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "accepted#1")
    caller, answers = call_in_background(sidecar)
    sidecar.wait_paused()
    first_ids = set(bus.topic.seen_ids)
    assert 0 < len(first_ids) < EVENTS
    os.kill(sidecar.proc.pid, signal.SIGTERM)
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    assert sidecar.proc.wait(60) == 0, sidecar.output()[-3000:]
    caller.join(60)
    [answer] = answers
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    kept = record(sidecar)
    sidecar.start()
    sidecar.wait_healthy()
    done = client.done(retry_seconds=60)
    delivered = bus.receive(event_id)
    ids = {e["eventId"] for e in done["events"]}
    assert len(ids) == EVENTS and set(delivered) == ids, (done, dict(delivered))
    twice = {i for i, n in delivered.items() if n > 1}
    print(f"\nat the stop: published {len(kept['published'])}, sending {len(kept['sending'])}, transfers "
          f"{bus.topic.transfers}, twice {len(twice)}")
    assert twice <= set(record(sidecar)["uncertain"]), (sorted(twice), record(sidecar))
    assert twice == set(), f"a graceful stop delivered {len(twice)} events twice; record at the stop {kept}"
    assert sidecar.stop() == 0


def test_an_event_edited_after_a_kill_mid_publish_is_refused_by_the_successor(tmp_path: Path, stack: Stack, bus: Bus,
                                                                              sidecars: list) -> None:
    """SIGKILL after the bus accepted the first batch and before its ids were recorded (the record says
    only that it was handed to the bus): the module rewrites one of those events' files; the successor
    answers 409 naming it and sends nothing."""
    from ion_sidecar_client import COMMITTED_ALREADY, SidecarCallError

    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "accepted#1")
    caller, answers = call_in_background(sidecar)
    sidecar.wait_paused()
    first_ids = set(bus.topic.seen_ids)
    kept = record(sidecar)
    assert set(kept["sending"]) == first_ids and kept["published"] == [], kept  # handed over, outcome not recorded
    sidecar.kill()
    caller.join(30)
    client.write_event("e0", "file_discovered", ["f0.txt"], index="rewritten")
    sidecar.start()
    sidecar.wait_healthy()
    with pytest.raises(SidecarCallError) as refused:
        client.done(retry_seconds=30)
    assert refused.value.status_code == 409 and COMMITTED_ALREADY in refused.value.body, refused.value.body
    assert "out/events/e0.json" in refused.value.body, refused.value.body
    delivered = bus.receive(event_id)
    assert set(delivered) == first_ids and all(n == 1 for n in delivered.values()), dict(delivered)
    assert all(m["data"] == [{"key": "index", "value": m["data"][0]["value"]}] and m["data"][0]["value"] != "rewritten"
               for m in stack.documents() if m["parentEventId"] == event_id)
    assert sidecar.stop() == 0


@pytest.mark.xfail(strict=True, reason=(
    "a SIGTERM cancels the publish at once and aborts its connection, so the batch whose transfer is out is "
    "recorded 'may have been delivered' and resent by the successor (3 of 9 events delivered twice on a topic "
    "without duplicate detection). Fix: on cancellation ServiceBusEventPublisher.publish waits a short, bounded "
    "while (~1 s) for the answer of the batch in flight (no new batch starts: halted()) before _abandon; to keep "
    "the deadline's bound, only on a stop, not when the flow's publish deadline cancels it"))
def test_sigterm_while_a_batch_awaits_the_bus_answer_delivers_each_event_once(tmp_path: Path, stack: Stack, bus: Bus,
                                                                               sidecars: list) -> None:
    """SIGTERM while the bus takes 3 s to answer the second batch (stored, not answered yet): a graceful
    stop could wait for that answer; cut off, the batch is "may have been delivered" and its events
    reach the children twice once the successor resends them."""
    broker = bus.peer._broker
    original, seen, storing = broker._incoming, [0], threading.Event()

    def slow_second(link, payload):
        outcome = original(link, payload)
        if isinstance(link.entity, Topic):
            seen[0] += 1
            if seen[0] == 2:
                storing.set()
                time.sleep(3)  # the answer (disposition) goes out only after this
        return outcome

    broker._incoming = slow_second
    sidecar, client, event_id = start_sidecar(tmp_path, stack, bus, sidecars, "")
    caller, answers = call_in_background(sidecar)
    assert storing.wait(60), "the second batch never reached the bus"
    os.kill(sidecar.proc.pid, signal.SIGTERM)
    assert sidecar.proc.wait(60) == 0, sidecar.output()[-3000:]
    caller.join(60)
    kept = record(sidecar)
    sidecar.start()
    sidecar.wait_healthy()
    done = client.done(retry_seconds=60)
    delivered = bus.receive(event_id)
    twice = {i for i, n in delivered.items() if n > 1}
    print(f"\nanswer {answers[0].status_code if isinstance(answers[0], httpx.Response) else answers[0]!r}; at the stop: "
          f"published {len(kept['published'])}, sending {len(kept['sending'])}; twice {len(twice)}")
    assert len(done["events"]) == EVENTS and set(delivered) == {e["eventId"] for e in done["events"]}
    assert twice <= set(record(sidecar)["uncertain"])
    assert twice == set(), f"a graceful stop cut off a batch in flight: {len(twice)} events delivered twice"
    assert sidecar.stop() == 0
