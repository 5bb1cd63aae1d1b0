"""Service Bus helpers: unique names, a TCP listener that never speaks AMQP, reading back what a
subscription got, and events to publish. The AMQP 1.0 peer itself is ``testsupport.amqp_peer``."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from dataclasses import dataclass

from azure.servicebus import ServiceBusReceiveMode
from azure.servicebus.aio import ServiceBusClient

from sidecar.models import Event, EventContext, KeyValuePair
from testsupport.amqp_peer import emulator_connection_string


def unique(prefix: str) -> str:
    """A name no other test uses (topics and event types live for the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class SilentListener:
    """A TCP listener on 127.0.0.1 that accepts connections and never sends a byte (a bus that hangs).

    ``closed`` is set once every accepted connection was closed by the client (it read EOF), so a
    test can tell that the client did not leak its socket.
    """

    def __init__(self, port: int | None = None):
        self.sock = socket.create_server(("127.0.0.1", port or 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.closed.clear()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    if not conn.recv(65536):
                        break
                except OSError:
                    break
        with self._lock:
            self.open -= 1
            if self.open == 0:
                self.closed.set()

    def connection_string(self) -> str:
        return emulator_connection_string(self.port)

    def close(self) -> None:
        """Stop listening (the port is free again once this returns)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()


@dataclass
class Received:
    """One message a subscription receiver got: the event in its body and its properties."""

    event: Event
    message_id: str
    correlation_id: str | None
    subject: str | None
    event_type: str | None  # application property eventType
    content_type: str | None


def _property(props: dict | None, name: str) -> str | None:
    for key, value in (props or {}).items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else value
    return None


async def receive_all(connection_string: str, topic: str, subscription: str = "sub",
                      idle_seconds: float = 0.5) -> list[Received]:
    """Everything waiting on ``topic/subscription``, received and deleted, until a receive waits
    ``idle_seconds`` without a message. (Peek-lock and complete are covered by test_amqp_peer.py;
    completing one message at a time costs a round trip each.)"""
    received: list[Received] = []
    async with ServiceBusClient.from_connection_string(connection_string, retry_total=0) as client:
        receiver = client.get_subscription_receiver(topic, subscription, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
        async with receiver:
            while batch := await receiver.receive_messages(max_message_count=100, max_wait_time=idle_seconds):
                for message in batch:
                    body = b"".join(message.body)
                    received.append(Received(
                        event=Event.model_validate(json.loads(body)), message_id=str(message.message_id),
                        correlation_id=message.correlation_id, subject=message.subject,
                        event_type=_property(message.application_properties, "eventType"),
                        content_type=message.content_type,
                    ))
    return received


def receive_all_sync(connection_string: str, topic: str, subscription: str = "sub") -> list[Received]:
    """:func:`receive_all` for synchronous tests."""
    return asyncio.run(receive_all(connection_string, topic, subscription))


def make_events(count: int, types: list[str], data_bytes: int = 0) -> list[Event]:
    """``count`` events cycling through ``types``, each carrying ``data_bytes`` of data."""
    correlation = unique("corr")
    return [Event(context=EventContext(eventId=unique("evt"), correlationId=correlation, parentEventId="evt-parent"),
                  type=types[i % len(types)], data=[KeyValuePair(key="pad", value="x" * data_bytes)] if data_bytes else [])
            for i in range(count)]
