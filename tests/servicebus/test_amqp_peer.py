"""The test peer behaves like Service Bus where the other tests rely on it: fan-out to subscriptions,
batches split into their messages, duplicate detection by message id, peek-lock with lock tokens,
complete and abandon. Checked with the SDK itself, as a Service Bus emulator would be."""

from __future__ import annotations

import asyncio
import uuid

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from testsupport.amqp_peer import AmqpPeer
from testsupport.servicebus import receive_all, unique


def test_batches_fan_out_to_every_subscription_once_per_message_id(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("fanout"), ["a", "b"])
    cs = amqp_peer.connection_string()

    async def run() -> tuple[list, list]:
        async with ServiceBusClient.from_connection_string(cs, retry_total=0) as client:
            async with client.get_topic_sender(topic.name) as sender:
                await sender.send_messages([ServiceBusMessage(f"m{i}", message_id=f"id{i}") for i in range(3)])
                await sender.send_messages(ServiceBusMessage("again", message_id="id1"))
        return await asyncio.gather(receive_all_raw(cs, topic.name, "a"), receive_all_raw(cs, topic.name, "b"))

    got_a, got_b = asyncio.run(run())
    assert topic.transfers == [3, 1] and topic.duplicates == 1
    assert got_a == got_b == ["m0", "m1", "m2"]


async def receive_all_raw(cs: str, topic: str, sub: str) -> list[str]:
    async with ServiceBusClient.from_connection_string(cs, retry_total=0) as client:
        async with client.get_subscription_receiver(topic, sub, receive_mode="receiveanddelete") as receiver:
            return [str(m) for m in await receiver.receive_messages(max_message_count=10, max_wait_time=0.5)]


def test_peek_lock_complete_removes_and_abandon_redelivers(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("lock"))
    cs = amqp_peer.connection_string()

    async def run() -> None:
        async with ServiceBusClient.from_connection_string(cs, retry_total=0) as client:
            async with client.get_topic_sender(topic.name) as sender:
                await sender.send_messages([ServiceBusMessage("keep", message_id="k"), ServiceBusMessage("done", message_id="d")])
            async with client.get_subscription_receiver(topic.name, "sub") as receiver:
                first = await receiver.receive_messages(max_message_count=2, max_wait_time=2)
                assert [str(m) for m in first] == ["keep", "done"]
                assert all(isinstance(m.lock_token, uuid.UUID) for m in first)  # from the 16-byte tags
                await receiver.abandon_message(first[0])
                await receiver.complete_message(first[1])
                again = await receiver.receive_messages(max_message_count=2, max_wait_time=1)
                assert [str(m) for m in again] == ["keep"]
                await receiver.complete_message(again[0])
        assert await receive_all(cs, topic.name) == []

    asyncio.run(run())


def test_duplicate_detection_can_be_switched_off(amqp_peer: AmqpPeer) -> None:
    topic = amqp_peer.create_topic(unique("nodedup"), ["a"], duplicate_detection=False)
    cs = amqp_peer.connection_string()

    async def run() -> list:
        async with ServiceBusClient.from_connection_string(cs, retry_total=0) as client:
            async with client.get_topic_sender(topic.name) as sender:
                await sender.send_messages(ServiceBusMessage("first", message_id="same"))
                await sender.send_messages(ServiceBusMessage("again", message_id="same"))
        return await receive_all_raw(cs, topic.name, "a")

    assert asyncio.run(run()) == ["first", "again"] and topic.duplicates == 1
