"""The production data plane on loopback: Azurite, nx-27017 and the AMQP 1.0 peer at once, each behind
a fault-injecting proxy (``testsupport.faults``), so a test can cut any data-plane service mid-run."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pymongo
from azure.storage.blob import ContainerClient

from flows.runtime import Runtime
from sidecar.cli import compose_config
from testsupport.amqp_peer import AmqpPeer
from testsupport.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, run_azurite
from testsupport.faults import FaultProxy
from testsupport.mongo import NxServer, collection_name
from testsupport.processes import SECRET, free_port
from testsupport.servicebus import Received, receive_all_sync, unique

# Distinctive secret values that must never reach a log line or the Prefect API.
MONGO_PASSWORD = "mongo-Pw-7f3e1c"
BUS_KEY = "SAS_KEY_VALUE"


@dataclass
class Stack:
    """Every real data-plane service of one test module, each reached through its fault proxy."""

    azurite: Azurite
    mongo: NxServer
    peer: AmqpPeer
    blob_proxy: FaultProxy
    docs_proxy: FaultProxy
    bus_proxy: FaultProxy
    container: str
    collection: str
    topic: str
    subscription: str = "next-module"

    @property
    def proxies(self) -> dict[str, FaultProxy]:
        return {"blob store": self.blob_proxy, "document store": self.docs_proxy, "event bus": self.bus_proxy}

    def blob_connection_string(self, direct: bool = False) -> str:
        port = self.azurite.port if direct else self.blob_proxy.port
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")

    def mongo_uri(self, direct: bool = False) -> str:
        port = self.mongo.port if direct else self.docs_proxy.port
        return f"mongodb://127.0.0.1:{port}/?directConnection=true"

    def bus_connection_string(self, direct: bool = False) -> str:
        port = self.peer.port if direct else self.bus_proxy.port
        return (f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;"
                f"SharedAccessKey={BUS_KEY};UseDevelopmentEmulator=true;")

    def seed_flags(self) -> list[str]:
        """The seed's provider flags for all three real providers, through the proxies."""
        return [
            "--azureblobprovider=true", f"--azureblobprovider.containername={self.container}",
            f"--azureblobprovider.connectionstring={self.blob_connection_string()}",
            "--mongodbdocprovider=true", f"--mongodbdocprovider.collection={self.collection}",
            f"--mongodbdocprovider.uri={self.mongo_uri()}", "--mongodbdocprovider.name=iondb",
            f"--mongodbdocprovider.password={MONGO_PASSWORD}",
            "--servicebuseventprovider=true", f"--servicebuseventprovider.topic={self.topic}",
            f"--servicebuseventprovider.connectionstring={self.bus_connection_string()}",
        ]

    # What the data plane holds, read directly (not through the proxies).
    def blobs(self, prefix: str = "") -> dict[str, bytes]:
        with ContainerClient.from_connection_string(self.blob_connection_string(direct=True), self.container) as c:
            if not c.exists():
                return {}
            return {b.name: c.download_blob(b.name).readall() for b in c.list_blobs(name_starts_with=prefix or None)}

    def documents(self, suffix: str = "") -> list[dict]:
        with pymongo.MongoClient(self.mongo_uri(direct=True), serverSelectionTimeoutMS=5000) as client:
            return list(client["ion"][self.collection + suffix].find({}))

    def received(self) -> list[Received]:
        """Drain the subscription: every message delivered since the last call."""
        return receive_all_sync(self.bus_connection_string(direct=True), self.topic, self.subscription)

    def up(self) -> None:
        for proxy in self.proxies.values():
            proxy.up()


@contextmanager
def run_stack(root: Path) -> Iterator[Stack]:
    """Start nx-27017 (data in ``root``), the AMQP peer and Azurite, each behind a fault proxy, with a
    fresh container, collection and topic; stop them all on exit.

    Raises:
        RuntimeError / FileNotFoundError: a service could not start (the caller fails, never skips).
    """
    mongo = NxServer(root)
    mongo.start()
    try:
        peer = AmqpPeer(free_port()).start()
        try:
            with run_azurite() as azurite:
                proxies = [FaultProxy(azurite.port), FaultProxy(mongo.port), FaultProxy(peer.port)]
                topic = peer.create_topic(unique("ion-events"), ["next-module"]).name
                stack = Stack(azurite, mongo, peer, *proxies, container=unique("ion").lower().replace("_", "-"),
                              collection=collection_name("prod"), topic=topic)
                try:
                    yield stack
                finally:
                    for proxy in proxies:
                        proxy.close()
        finally:
            peer.stop()
    finally:
        mongo.stop()  # also when the peer or Azurite could not start


def seed_args(stack: Stack, event_id: str, correlation_id: str, name: str, parent: str = "") -> list[str]:
    """Seed flags of a sidecar with every real provider of ``stack``."""
    args = [f"--context.correlationid={correlation_id}", f"--context.eventid={event_id}",
            f"--context.parenteventid={parent}", f"--context.name={name}", "--loglevel=info",
            "--valideventtypes=file_discovered"]
    return args + stack.seed_flags()


def stack_runtime(stack: Stack, tmp_path: Path, event_id: str, name: str = "mod") -> Runtime:
    """An in-process runtime on ``stack`` with short timeouts and one task retry (fault trials, soak)."""
    cfg, _ = compose_config(seed_args(stack, event_id, "corr-" + event_id, name) + [
        f"--sharedsecret={SECRET}", f"--basedir={tmp_path / event_id}", f"--devdir={tmp_path / '.dev'}",
        "--transfer.retries=1", "--transfer.retrydelayseconds=0.1",
        "--mongodbdocprovider.serverselectiontimeoutseconds=1", "--mongodbdocprovider.sockettimeoutseconds=5",
        "--servicebuseventprovider.publishtimeoutseconds=10",
    ])
    return Runtime.for_config(cfg)
