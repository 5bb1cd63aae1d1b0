"""What only the Service Bus publisher does: batching, bounded waiting, error mapping, connection
reuse and teardown (issue 4). Runs over the AMQP peer (``testsupport/amqp_peer.py``), a listener that accepts TCP
and never speaks AMQP, and a port nobody listens on."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from sidecar.providers.servicebus.config import ServiceBusConfig
from sidecar.providers.servicebus.publisher import PER_EVENT_TYPE, ServiceBusEventPublisher, connection_string, topic_of
from sidecar.errors import DataPlaneError, DataPlaneUnavailable
from sidecar.models import Event
from testsupport.amqp_peer import AmqpPeer, emulator_connection_string
from testsupport.processes import free_port
from testsupport.servicebus import SilentListener, make_events, receive_all_sync, unique

DEADLINE = 1.5  # seconds, publishtimeoutseconds of the bounded-waiting tests
# Time allowed past the deadline for tearing the connection down and returning, seconds.
MARGIN = 1.5


def publisher_for(cs: str, topic: str = "events", deadline: float = 20) -> ServiceBusEventPublisher:
    return ServiceBusEventPublisher(ServiceBusConfig(enabled=True, connectionstring=cs, topic=topic,
                                                     publishtimeoutseconds=deadline))


async def timed_publish(publisher: ServiceBusEventPublisher, events: list[Event]) -> tuple[BaseException | None, float]:
    """Publish, close; returns the error raised (or None) and the seconds the publish took."""
    started = time.monotonic()
    error = None
    try:
        await publisher.publish(events)
    except Exception as exc:
        error = exc
    elapsed = time.monotonic() - started
    await publisher.close()
    return error, elapsed


def test_connection_string_from_namespace_rule_and_key() -> None:
    cfg = ServiceBusConfig(enabled=True, namespace="ion-ns", authorizationrulename="Send", key="k3y=")
    assert connection_string(cfg) == ("Endpoint=sb://ion-ns.servicebus.windows.net/;SharedAccessKeyName=Send;"
                                      "SharedAccessKey=k3y=")
    cfg.connectionstring = "Endpoint=sb://127.0.0.1:5672;UseDevelopmentEmulator=true"
    assert connection_string(cfg) == cfg.connectionstring


@pytest.mark.parametrize("topic, expected", [("events", "events"), ("", "file_discovered"),
                                             (PER_EVENT_TYPE, "file_discovered")])
def test_topic_is_the_configured_one_or_the_event_type(topic: str, expected: str) -> None:
    [event] = make_events(1, ["file_discovered"])
    assert topic_of(ServiceBusConfig(topic=topic), event) == expected


def test_events_that_fit_go_out_in_one_batch(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("batch"))
    error, _ = asyncio.run(timed_publish(publisher_for(amqp_peer.connection_string(), topic.name),
                                         make_events(40, ["t"])))
    assert error is None
    assert topic.transfers == [40]


def test_events_beyond_the_size_limit_go_out_in_as_few_batches_as_fit(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("batches"))
    events = make_events(150, ["t"], data_bytes=4000)  # ~600 KB: more than two 256 KiB batches
    error, _ = asyncio.run(timed_publish(publisher_for(amqp_peer.connection_string(), topic.name), events))
    assert error is None
    per_batch = topic.transfers[0]
    assert sum(topic.transfers) == 150 and len(topic.transfers) == math.ceil(150 / per_batch) == 3
    assert all(n == per_batch for n in topic.transfers[:-1])  # every batch but the last is full
    assert len(receive_all_sync(amqp_peer.connection_string(), topic.name)) == 150


def test_a_bus_that_never_speaks_amqp_fails_at_the_deadline_and_leaves_no_connection(
        silent_listener: SilentListener) -> None:
    publisher = publisher_for(silent_listener.connection_string(), "stuck", DEADLINE)
    error, elapsed = asyncio.run(timed_publish(publisher, make_events(3, ["t"])))
    assert isinstance(error, DataPlaneUnavailable) and error.status_code == 503
    assert "event bus" in error.message and "'stuck'" in error.message
    assert DEADLINE <= elapsed <= DEADLINE + MARGIN
    assert silent_listener.accepted == 1
    assert silent_listener.closed.wait(5), "the publisher left its connection to the silent bus open"


def test_a_bus_that_never_answers_the_token_fails_at_the_deadline_and_leaves_no_connection() -> None:
    peer = AmqpPeer(free_port()).start()
    try:
        peer.stall_tokens = True
        peer.create_topic("stalled")
        error, elapsed = asyncio.run(timed_publish(publisher_for(peer.connection_string(), "stalled", DEADLINE),
                                                   make_events(3, ["t"])))
        assert isinstance(error, DataPlaneUnavailable) and "'stalled'" in error.message
        assert DEADLINE <= elapsed <= DEADLINE + MARGIN
        assert peer.accepted == 1
        deadline = time.monotonic() + 5
        while peer.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer.open_connections == 0
        assert peer.topics["stalled"].transfers == []
    finally:
        peer.stop()


def test_a_refused_connection_fails_within_the_deadline() -> None:
    cs = emulator_connection_string(free_port())  # nobody listens there
    error, elapsed = asyncio.run(timed_publish(publisher_for(cs, "nobody", DEADLINE), make_events(1, ["t"])))
    assert isinstance(error, DataPlaneUnavailable) and "event bus" in error.message and "'nobody'" in error.message
    assert elapsed <= DEADLINE + MARGIN


@pytest.mark.parametrize("key_name, key", [("RootManageSharedAccessKey", "wrong-key"), ("NoSuchRule", "SAS_KEY_VALUE")])
def test_a_refused_token_is_a_permanent_error_that_does_not_show_the_key(amqp_peer: AmqpPeer, key_name: str, key: str) -> None:
    topic = amqp_peer.create_topic(unique("auth"))
    publisher = publisher_for(amqp_peer.connection_string(key_name, key), topic.name)
    error, _ = asyncio.run(timed_publish(publisher, make_events(1, ["t"])))
    assert isinstance(error, DataPlaneError) and error.status_code == 502
    assert "event bus" in error.message and topic.name in error.message and key not in error.message
    assert topic.transfers == []


def test_one_connection_serves_many_publishes_and_close_releases_it(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("reuse"))
    before = amqp_peer.accepted

    async def run() -> None:
        publisher = publisher_for(amqp_peer.connection_string(), topic.name)
        for _ in range(3):
            await publisher.publish(make_events(2, ["t"]))
        assert amqp_peer.accepted - before == 1
        await publisher.close()

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while amqp_peer.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert amqp_peer.open_connections == 0
    assert topic.transfers == [2, 2, 2]


def test_a_publisher_recovers_when_the_bus_comes_back() -> None:
    port = free_port()
    cs = emulator_connection_string(port)
    events = make_events(3, ["t"])

    async def run(peer_holder: list[AmqpPeer]) -> None:
        publisher = publisher_for(cs, "back", DEADLINE)
        with pytest.raises(DataPlaneUnavailable):
            await publisher.publish(events)
        peer = AmqpPeer(port).start()
        peer_holder.append(peer)
        peer.create_topic("back")
        await publisher.publish(events)  # same publisher: a fresh connection after the failure
        await publisher.close()

    holder: list[AmqpPeer] = []
    try:
        asyncio.run(run(holder))
        assert sorted(r.message_id for r in receive_all_sync(cs, "back")) == sorted(e.id for e in events)
    finally:
        for peer in holder:
            peer.stop()
