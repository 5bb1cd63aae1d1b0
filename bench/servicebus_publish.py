"""Side-by-side timings of the event publishers, printed as ratios from one run.

Run: ``.venv/bin/python bench/servicebus_publish.py [events]`` (default 200). Service Bus here is the
test AMQP peer (testsupport/amqp_peer.py) on loopback, so the figures compare client-side costs
(batching, connection set-up, the deadline), not a real namespace's latency.

1. publish N events: the file publisher, the Service Bus publisher (batched; its first publish,
   which connects, and a publish on a sender already open), and a naive publisher sending one message
   per ``send_messages``;
2. bounded waiting: how long a publish takes to fail against a bus that never speaks AMQP (relative
   to the deadline) and against a refused port, and the SDK's own default (``retry_total=3``) against
   the same refused port.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from azure.servicebus import ServiceBusMessage  # noqa: E402
from azure.servicebus.aio import ServiceBusClient  # noqa: E402

from sidecar.providers.servicebus.config import ServiceBusConfig  # noqa: E402
from sidecar.providers.eventfiles import FileEventPublisher  # noqa: E402
from sidecar.providers.servicebus.publisher import ServiceBusEventPublisher, to_message  # noqa: E402
from sidecar.errors import DataPlaneUnavailable  # noqa: E402
from testsupport.amqp_peer import AmqpPeer, emulator_connection_string  # noqa: E402
from testsupport.processes import free_port  # noqa: E402
from testsupport.servicebus import SilentListener, make_events  # noqa: E402

DEADLINE = 2.0


async def seconds(coro) -> float:
    started = time.perf_counter()
    try:
        await coro
    except DataPlaneUnavailable:
        pass
    except Exception as exc:  # the SDK's own error, in the default-retries measurement
        if "Connect call failed" not in str(exc) and "socket" not in str(exc).lower():
            raise
    return time.perf_counter() - started


async def naive(cs: str, topic: str, events) -> None:
    async with ServiceBusClient.from_connection_string(cs, retry_total=0) as client:
        async with client.get_topic_sender(topic) as sender:
            for event in events:
                await sender.send_messages(to_message(event))


async def sdk_default(cs: str) -> None:
    async with ServiceBusClient.from_connection_string(cs) as client:
        async with client.get_topic_sender("t") as sender:
            await sender.send_messages(ServiceBusMessage("x"))


async def main(count: int) -> None:
    peer = AmqpPeer(free_port()).start()
    cs = peer.connection_string()
    for name in ("first", "reused", "naive"):
        peer.create_topic(name)
    with tempfile.TemporaryDirectory() as tmp:
        file_s = await seconds(FileEventPublisher(Path(tmp)).publish(make_events(count, ["t"])))
    publisher = ServiceBusEventPublisher(ServiceBusConfig(enabled=True, connectionstring=cs, topic="first"))
    first_s = await seconds(publisher.publish(make_events(count, ["t"])))
    publisher.cfg.topic = "reused"
    await seconds(publisher.publish(make_events(1, ["t"])))  # opens this topic's sender (and connection)
    reused_s = await seconds(publisher.publish(make_events(count, ["t"])))
    await publisher.close()
    naive_s = await seconds(naive(cs, "naive", make_events(count, ["t"])))
    print(f"publish {count} events, seconds: file {file_s:.3f} | service bus first {first_s:.3f} "
          f"(batches {peer.topics['first'].transfers}) | warm sender {reused_s:.3f} | one send per "
          f"message {naive_s:.3f}")
    print(f"  one send per message / batched (warm sender): {naive_s / reused_s:.1f}x")
    print(f"  first publish (connect, authenticate, attach) / warm sender: {first_s / reused_s:.1f}x")
    print(f"  service bus batched (warm sender) / file: {reused_s / file_s:.1f}x")
    peer.stop()

    listener = SilentListener()
    hang = ServiceBusEventPublisher(ServiceBusConfig(enabled=True, connectionstring=listener.connection_string(),
                                                     topic="t", publishtimeoutseconds=DEADLINE))
    hang_s = await seconds(hang.publish(make_events(1, ["t"])))
    closed = listener.closed.wait(5)
    listener.close()
    refused_cs = emulator_connection_string(free_port())  # nobody listens there
    refused = ServiceBusEventPublisher(ServiceBusConfig(enabled=True, connectionstring=refused_cs, topic="t",
                                                        publishtimeoutseconds=DEADLINE))
    refused_s = await seconds(refused.publish(make_events(1, ["t"])))
    default_s = await seconds(sdk_default(refused_cs))
    print(f"silent bus: failed after {hang_s:.3f} s with a {DEADLINE:g} s deadline ({hang_s / DEADLINE:.3f}x the "
          f"deadline), connection closed: {closed}")
    print(f"refused port: this publisher {refused_s:.3f} s | SDK default retries {default_s:.3f} s "
          f"({default_s / refused_s:.0f}x)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
