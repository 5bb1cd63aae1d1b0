"""Every provider of every building block, as the conformance suites (``tests/conformance/``) drive it.

A provider is chosen the way a user chooses it, by the seed's flags, and built by the sidecar's own
factory (``sidecar.dataplane.build_dataplane``), so the suites test what runs. Each provider class says
how to reach its local peer (``service``: the name of the session fixture that runs it, or None for a
development provider that needs none) and how to open a :class:`Subject` on it: the flags of a healthy
provider, of one whose endpoint nobody listens on, of one with refused credentials, the secrets that
must never show, and how to read back what the provider stored (from the service itself, not
through the provider under test: ``BlobSubject.stored_keys``, ``DocumentSubject.copies``,
``EventSubject.published``).

Adding a provider: its class here (a few lines: its flags, its secret, how to read back) and one line in
the building block's matrix in ``tests/conformance/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar
from urllib.parse import quote_plus

from sidecar.cli import compose_config
from sidecar.dataplane import DataPlane, build_dataplane
from sidecar.models import Event, EventMeta, Insight
from testsupport.amqp_peer import AmqpPeer, emulator_connection_string
from testsupport.azurite import Azurite
from testsupport.mongo import AuthRefusingProxy, NxServer, collection_name
from testsupport.processes import free_port
from testsupport.servicebus import Received, receive_all, unique

# Values that pass every settings check but no service accepts: a well-formed key nobody issued.
WRONG_ACCOUNT_KEY = "V3JvbmdLZXktY29uZm9ybWFuY2UtbmV2ZXItc2hvd24tQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
WRONG_BUS_KEY = "wrong-SAS-key-conformance-8d1e"
MONGO_PASSWORD = "mongo-Pw-conformance-41c7"


def open_dataplane(flags: list[str], devdir: Path) -> DataPlane:
    """The data plane a sidecar started with ``flags`` (provider flags, seed syntax) would use; the
    development providers keep their files under ``devdir``.

    Raises:
        sidecar.cli.UsageError: the flags are refused at start-up.
    """
    cfg, _ = compose_config(["--context.eventid=evt-conformance", "--context.correlationid=corr-conformance",
                             "--context.name=conformance", "--sharedsecret=conformance-secret-Zq9",
                             f"--basedir={devdir.parent / 'ion'}", f"--devdir={devdir}", *flags])
    return build_dataplane(cfg)


@dataclass
class Subject:
    """One provider opened on its peer for one test.

    ``flags``: a healthy provider; ``unreachable``: the same provider whose endpoint refuses every
    connection (None: it has no endpoint); ``refused``: its credentials refused by the service (None:
    it has none); ``secrets``: every configured secret value, which no message or log line may carry.
    """

    provider: "Provider"
    service: Any
    devdir: Path
    flags: list[str]
    unreachable: list[str] | None = None
    refused: list[str] | None = None
    secrets: tuple[str, ...] = ()
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Stop what :meth:`Provider.open` started for this subject (e.g. a proxy)."""
        for close in self.closers:
            close()

    def dataplane(self, flags: list[str] | None = None) -> DataPlane:
        """A new data plane (another sidecar) on the same storage; ``flags`` default :attr:`flags`."""
        return open_dataplane(self.flags if flags is None else flags, self.devdir)


class Provider:
    """A provider under the conformance suite (see the module docstring)."""

    name: ClassVar[str]
    service: ClassVar[str | None] = None

    def open(self, service: Any, tmp_path: Path) -> Subject:
        """A :class:`Subject` on ``service`` (the fixture named by :attr:`service`, None for a development
        provider) whose development files live under ``tmp_path/.dev``; may start helpers (a proxy)
        that ``Subject.close`` stops."""
        raise NotImplementedError

    def refusal_seen(self, subject: Subject, exc: BaseException) -> bool:
        """Whether the service really refused ``subject.refused``'s credentials (not just any failure)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


# --- blob store ----------------------------------------------------------------------------------

@dataclass
class BlobSubject(Subject):
    """A blob store subject that can also list the keys stored, read from the storage itself."""

    def stored_keys(self) -> set[str]:
        """Every blob key the storage holds now (partial downloads are not blobs)."""
        return self.provider.stored_keys(self)  # type: ignore[attr-defined]


class LocalBlobs(Provider):
    """Development blob store: files under ``{devdir}/blobs``."""

    name = "local"

    def open(self, service: None, tmp_path: Path) -> BlobSubject:
        return BlobSubject(self, service, tmp_path / ".dev", [])

    def stored_keys(self, subject: Subject) -> set[str]:
        root = subject.devdir / "blobs"
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


class AzureBlobs(Provider):
    """Azure Blob Storage on Azurite, a fresh container per test, 64 KiB blocks (so test files take the
    chunked Put Block path)."""

    name = "azure"
    service = "azurite"

    def open(self, azurite: Azurite, tmp_path: Path) -> BlobSubject:
        container = f"c{uuid.uuid4().hex[:20]}"

        def flags(connection_string: str) -> list[str]:
            return ["--azureblobprovider=true", f"--azureblobprovider.containername={container}",
                    f"--azureblobprovider.connectionstring={connection_string}",
                    f"--azureblobprovider.chunkbytes={64 * 1024}", "--azureblobprovider.connecttimeoutseconds=5",
                    "--azureblobprovider.readtimeoutseconds=10"]

        nobody = azurite.connection_string().replace(f":{azurite.port}/", f":{free_port()}/")
        subject = BlobSubject(self, azurite, tmp_path / ".dev", flags(azurite.connection_string()),
                              unreachable=flags(nobody), refused=flags(azurite.connection_string(WRONG_ACCOUNT_KEY)),
                              secrets=(azurite.connection_string(), _account_key(azurite.connection_string()),
                                       WRONG_ACCOUNT_KEY))
        subject.container = container  # type: ignore[attr-defined]
        return subject

    def stored_keys(self, subject: Subject) -> set[str]:
        # The service's own List Blobs, through a plain SDK client of its own (not the provider's).
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(subject.service.connection_string()) as service:
            container = service.get_container_client(subject.container)  # type: ignore[attr-defined]
            return set(container.list_blob_names()) if container.exists() else set()

    def refusal_seen(self, subject: Subject, exc: BaseException) -> bool:
        # Azurite answered 403 (AuthorizationFailure: the signature does not match the account key).
        return any(getattr(e, "status_code", None) == 403 for e in chain(exc))


def chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _account_key(connection_string: str) -> str:
    return next(part.split("=", 1)[1] for part in connection_string.split(";") if part.startswith("AccountKey="))


# --- document store ------------------------------------------------------------------------------

@dataclass
class DocumentSubject(Subject):
    """A document store subject that can also count stored copies of a document (``kind``:
    ``eventmeta`` or ``insight``), read from the storage itself."""

    def copies(self, kind: str, doc_id: str) -> int:
        return self.provider.copies(self, kind, doc_id)  # type: ignore[attr-defined]


class JsonFileDocuments(Provider):
    """Development document store: one JSON file per document under ``{devdir}/documents``."""

    name = "jsonfiles"

    def open(self, service: None, tmp_path: Path) -> DocumentSubject:
        return DocumentSubject(self, service, tmp_path / ".dev", [])

    def copies(self, subject: Subject, kind: str, doc_id: str) -> int:
        folder = subject.devdir / "documents" / kind
        return sum(json.loads(p.read_text())["id"] == doc_id for p in folder.glob("*.json"))


class MongoDocuments(Provider):
    """MongoDB on nx-27017, a fresh collection per test; refused credentials come from a proxy that
    answers authentication as MongoDB refuses a wrong password (nx-27017 has no authentication)."""

    name = "mongo"
    service = "mongo_server"

    def open(self, server: NxServer, tmp_path: Path) -> DocumentSubject:
        collection = collection_name("conf")

        def flags(uri: str) -> list[str]:
            return ["--mongodbdocprovider=true", f"--mongodbdocprovider.uri={uri}",
                    f"--mongodbdocprovider.collection={collection}",
                    "--mongodbdocprovider.serverselectiontimeoutseconds=2",
                    "--mongodbdocprovider.connecttimeoutseconds=2", "--mongodbdocprovider.sockettimeoutseconds=10"]

        refusing = AuthRefusingProxy(server.port)
        with_password = f"mongodb://iondb:{quote_plus(MONGO_PASSWORD)}@127.0.0.1:{refusing.port}/?directConnection=true"
        subject = DocumentSubject(self, server, tmp_path / ".dev", flags(server.uri),
                                  unreachable=flags(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"),
                                  refused=flags(with_password), secrets=(MONGO_PASSWORD, with_password),
                                  closers=[refusing.close])
        subject.refusing = refusing  # type: ignore[attr-defined]
        return subject

    def refusal_seen(self, subject: Subject, exc: BaseException) -> bool:
        return subject.refusing.refused > 0  # type: ignore[attr-defined]

    def copies(self, subject: Subject, kind: str, doc_id: str) -> int:
        collection = next(f.split("=", 1)[1] for f in subject.flags if f.startswith("--mongodbdocprovider.collection="))
        name = collection + ("_insights" if kind == "insight" else "")  # the records' layout (README)
        with subject.service.client() as client:
            return len(list(client["ion"][name].find({"id": doc_id})))


# --- event publisher -----------------------------------------------------------------------------

@dataclass
class EventSubject(Subject):
    """An event publisher subject: declare the topics of ``types`` on the service (``prepare``) and read
    back, per event type, what a consumer of that type receives (``published``)."""

    topic: str = ""

    def prepare(self, types: list[str]) -> None:
        self.provider.prepare(self, types)  # type: ignore[attr-defined]

    def published(self, types: list[str]) -> dict[str, list[Received]]:
        return self.provider.published(self, types)  # type: ignore[attr-defined]


class FileEvents(Provider):
    """Development event publisher: one JSON file per event id under ``{devdir}/events`` (the file name
    is the message id)."""

    name = "files"

    def open(self, service: None, tmp_path: Path) -> EventSubject:
        return EventSubject(self, service, tmp_path / ".dev", [])

    def prepare(self, subject: EventSubject, types: list[str]) -> None:
        pass

    def published(self, subject: EventSubject, types: list[str]) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {t: [] for t in types}
        for file in sorted((subject.devdir / "events").glob("*.json")):
            event = Event.model_validate(json.loads(file.read_text()))
            found.setdefault(event.type, []).append(Received(
                event=event, message_id=event.id, correlation_id=event.context.correlationId,
                subject=event.type, event_type=event.type, content_type="application/json"))
        return found


class ServiceBusEvents(Provider):
    """Azure Service Bus on the AMQP 1.0 peer; ``per_type``: topic ``{eventType}`` (one topic per event
    type), else one fixed topic that consumers filter on the ``eventType`` application property, as a
    subscription rule would. Exactly once relies on duplicate detection by message id (the peer has it)."""

    service = "amqp_peer"

    def __init__(self, per_type: bool):
        self.per_type = per_type
        self.name = "servicebus-per-type" if per_type else "servicebus-topic"

    def open(self, peer: AmqpPeer, tmp_path: Path) -> EventSubject:
        topic = "{eventType}" if self.per_type else unique("events")  # the flag's value for a topic per type

        def flags(connection_string: str) -> list[str]:
            return ["--servicebuseventprovider=true", f"--servicebuseventprovider.connectionstring={connection_string}",
                    f"--servicebuseventprovider.topic={topic}", "--servicebuseventprovider.publishtimeoutseconds=20"]

        key = peer.connection_string().split("SharedAccessKey=")[1].split(";")[0]
        subject = EventSubject(self, peer, tmp_path / ".dev", flags(peer.connection_string()),
                               unreachable=flags(emulator_connection_string(free_port())),
                               refused=flags(peer.connection_string(key=WRONG_BUS_KEY)),
                               secrets=(key, WRONG_BUS_KEY, peer.connection_string()), topic=topic)
        subject.tokens_before = len(peer.put_tokens)  # type: ignore[attr-defined] - the session's peer
        return subject

    def refusal_seen(self, subject: Subject, exc: BaseException) -> bool:
        # The peer answered a put-token on $cbs with 401 (the SAS signature does not match the key).
        tokens = subject.service.put_tokens[subject.tokens_before:]  # type: ignore[attr-defined]
        return any(kind == "sas" and problem for kind, problem in tokens)

    def prepare(self, subject: EventSubject, types: list[str]) -> None:
        for topic in types if self.per_type else [subject.topic]:
            subject.service.create_topic(topic, ["sub"])

    def published(self, subject: EventSubject, types: list[str]) -> dict[str, list[Received]]:
        cs = subject.service.connection_string()
        if self.per_type:
            async def each() -> list[list[Received]]:
                return await asyncio.gather(*(receive_all(cs, t) for t in types))

            return dict(zip(types, asyncio.run(each())))
        everything = asyncio.run(receive_all(cs, subject.topic))
        return {t: [r for r in everything if r.event_type == t] for t in types}


def meta(event_id: str, *, label: str = "v1", files: int = 2, **data: str) -> EventMeta:
    """An event meta for ``event_id`` with ``files`` files and the pairs ``label`` (and ``data``)."""
    from sidecar.models import BlobFile, KeyValuePair

    pairs = [KeyValuePair(key="label", value=label), KeyValuePair(key="quote", value='"$x.y": {}')]
    pairs += [KeyValuePair(key=k, value=v) for k, v in data.items()]
    return EventMeta(
        id=event_id, eventId=event_id, correlationId="corr-ü", parentEventId="evt-parent",
        eventType="file_discovered", producer="parent",
        files=[BlobFile(path=f"found/f{i}.txt", key=f"evt-parent/parent/found/f{i}.txt", size=10 * i,
                        md5="0" * 32 if i else None, url=None) for i in range(files)],
        data=pairs)


def insight(execution_id: str, *, label: str = "v1") -> Insight:
    """An insight for ``execution_id`` with the pair ``label``."""
    from sidecar.models import KeyValuePair

    return Insight(id=execution_id, executionId=execution_id, eventId="evt-1", correlationId="corr-1",
                   parentEventId="", name="module", data=[KeyValuePair(key="label", value=label)])
