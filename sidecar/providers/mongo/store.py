"""MongoDB DocumentStore on pymongo's asyncio client (``AsyncMongoClient``): self-hosted MongoDB, or
Cosmos DB's API for MongoDB.

Records (``DESIGN.md``: Data plane records): each document is the model's JSON (camelCase fields
``id``, ``eventId``, ``correlationId``, ``parentEventId``, ``files``, ``data``, ... kept from the
original Sidecar so existing consumers can query them) plus ``_id`` set to the same key: the child
event id for an event meta, the execution id for an insight. Every write is a replace-with-upsert on
``_id``, so a retried write leaves exactly one copy on any Mongo-compatible server (``_id`` is unique
in every collection, whatever indexes the server supports).

Collections: event metas live in ``cfg.collection`` itself (where the original kept them and consumers
look them up by ``id``); insights live in ``{cfg.collection}_insights``. Two collections keep the two
key spaces apart: an execution id can never replace an event meta, and a lookup of one kind never
returns the other.

Retries: Prefect's task retries are the one retry layer (``flows/runtime.py``), so pymongo's own
retryable writes and reads are off (``retryWrites=false``, which Cosmos DB requires anyway, and
``retryReads=false``); every error surfaces at once as :class:`DataPlaneUnavailable` (transient, the
task retries it, HTTP 503) or :class:`DataPlaneError` (permanent, HTTP 502).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import quote_plus

from bson.errors import BSONError
from pymongo import AsyncMongoClient, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConfigurationError, ConnectionFailure, OperationFailure, PyMongoError
from pymongo.server_selectors import writable_server_selector

from sidecar.dataplane.documents import STORE, R, parse_record
from sidecar.dataplane.errors import first_line, permanent, transient, translated
from sidecar.errors import DataPlaneTimeout
from sidecar.models import EventMeta, Insight
from sidecar.providers.mongo.config import MongoConfig

T = TypeVar("T")

# Server error codes worth retrying with the same request: the retryable-writes spec's list
# (https://github.com/mongodb/specifications, retryable-writes.md: not primary, shutting down,
# network errors, ExceededTimeLimit), MaxTimeMSExpired and WriteConflict, Cosmos DB's
# "request rate is large" throttling (16500, https://learn.microsoft.com/azure/cosmos-db/mongodb/
# error-codes-solutions), and DuplicateKey, which two concurrent upserts of one new ``_id`` can raise
# (https://www.mongodb.com/docs/manual/reference/method/db.collection.update/#upsert-with-duplicate-values):
# the retried upsert then matches the document the other writer inserted.
TRANSIENT_CODES = frozenset({
    6, 7, 89, 91, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436,  # retryable-writes spec
    50, 112,  # MaxTimeMSExpired, WriteConflict
    16500,  # Cosmos DB: TooManyRequests
    11000,  # DuplicateKey (concurrent upserts of one new _id)
})

INSIGHTS_SUFFIX = "_insights"
DEFAULT_DATABASE = "ion"


def cosmos_uri(cfg: MongoConfig) -> str:
    """The Cosmos DB for MongoDB connection URI for ``cfg``, built as the original Sidecar connected.

    Host ``cfg.host`` with ``{name}`` replaced by ``cfg.name`` (default
    ``{name}.documents.azure.com``), port ``cfg.port`` (Cosmos uses 10255), TLS on, user ``cfg.name``
    and password ``cfg.password`` (both percent-escaped, RFC 3986, as pymongo requires), database
    ``cfg.name``, ``retryWrites=false`` (Cosmos DB does not support retryable writes). The result holds
    the password: never log it.
    """
    host = cfg.host.replace("{name}", cfg.name)  # literal: no other brace in the value is special
    user, password = quote_plus(cfg.name), quote_plus(cfg.password)
    database = quote_plus(cfg.name)
    return f"mongodb://{user}:{password}@{host}:{cfg.port}/{database}?tls=true&retryWrites=false"


def client_options(cfg: MongoConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`pymongo.AsyncMongoClient` (they win over the same options in a URI).

    Timeouts come from ``cfg`` in seconds and go to pymongo in milliseconds; pymongo's own retries are
    off. ``AsyncMongoClient`` connects on the first request only, so start-up never needs the server.

    ``sockettimeoutseconds`` is the total deadline of each call: pymongo's client-side operation
    timeout ``timeoutMS`` (pymongo 4.2+, the "Client Side Operation Timeout" specification), which bounds
    server selection (to the smaller of it and ``serverSelectionTimeoutMS``), checking out or opening a
    connection, sending the command and reading its whole reply, and sends the server the time left as
    ``maxTimeMS``. Past it pymongo raises a timeout (``NetworkTimeout``, ``ExecutionTimeout`` or
    ``ServerSelectionTimeoutError``: HTTP 503, not retried). ``socketTimeoutMS`` would bound each
    reply on its own, so a call of several round trips (a new connection's handshake, then the
    command; a bulk write in several batches) could take several of them; with ``timeoutMS`` set
    pymongo ignores it, so it is not passed.
    """
    return {
        "serverSelectionTimeoutMS": int(cfg.serverselectiontimeoutseconds * 1000),
        "connectTimeoutMS": int(cfg.connecttimeoutseconds * 1000),
        "timeoutMS": int(cfg.sockettimeoutseconds * 1000),
        "retryWrites": False,
        "retryReads": False,
    }


def retryable(exc: PyMongoError) -> bool:
    """True when retrying the same request may succeed: connection failures and timeouts, and server
    errors whose codes (every write error's, for a bulk write) are in ``TRANSIENT_CODES`` or that the
    server labels ``RetryableWriteError``."""
    if isinstance(exc, ConnectionFailure):  # includes AutoReconnect, ServerSelectionTimeoutError, NetworkTimeout
        return True
    if exc.has_error_label("RetryableWriteError"):
        return True
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors", []) + exc.details.get("writeConcernErrors", [])
        return bool(errors) and all(e.get("code") in TRANSIENT_CODES for e in errors)
    if isinstance(exc, OperationFailure):
        return exc.code in TRANSIENT_CODES
    return False


def _names(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{i}'" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def translate(exc: Exception, what: str) -> BaseException:
    """The document store's error for pymongo's ``exc`` while doing ``what`` (``sidecar.dataplane.errors``).

    pymongo's text names hosts, codes and server messages, never the credentials; the topology
    description a selection timeout appends only repeats the error per host. A ``ConfigurationError``
    may quote parts of the URI (credentials), so only the setting is named.
    """
    if isinstance(exc, ConfigurationError):
        return permanent(STORE, what, text=f"{what}: {type(exc).__name__}: check --mongodbdocprovider.uri "
                                           "or .name/.password/.host/.port")
    if isinstance(exc, PyMongoError):
        text = f"{what}: {type(exc).__name__}: {first_line(str(exc).split(', Topology Description:')[0])}"
        if exc.timeout:  # the call's timeoutMS passed, whichever error pymongo raised for it
            return DataPlaneTimeout(STORE, f"{text} (the call's bound: --mongodbdocprovider.sockettimeoutseconds)")
        return transient(STORE, what, text=text) if retryable(exc) else permanent(STORE, what, text=text)
    if isinstance(exc, BSONError):
        return permanent(STORE, what, exc)
    return exc


class MongoDocumentStore:
    """DocumentStore on MongoDB or Cosmos DB's API for MongoDB (see the module docstring).

    Args:
        cfg: ``--mongodbdocprovider.*``. With ``cfg.uri`` that URI is used as given (its database, or
            ``cfg.name``, or ``"ion"``); without it, :func:`cosmos_uri`. Either way the timeouts and
            retry settings of :func:`client_options` apply.

    The client is created on first use (no network I/O at start-up), one per event loop: pymongo's
    asyncio client and its pooled connections belong to the loop that created them.

    Errors (:func:`translate`): connection failures, timeouts and the transient server codes in
    ``TRANSIENT_CODES`` raise ``DataPlaneUnavailable("document store", ...)``; any other failure
    (authentication, bad collection name, a stored document that is not a valid record) raises
    ``DataPlaneError("document store", ...)``. Messages name the collection and the document ids,
    never the URI or password.
    """

    def __init__(self, cfg: MongoConfig):
        self.cfg = cfg
        self._client: AsyncMongoClient | None = None
        self._collections: tuple[AsyncCollection, AsyncCollection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return f"MongoDB, collection '{self.cfg.collection}'"

    def open(self) -> tuple[AsyncCollection, AsyncCollection]:
        """The (event metas, insights) collections; creates the client on first use, without I/O.

        Raises:
            pymongo.errors.ConfigurationError: a malformed URI or option.
            pymongo.errors.InvalidName: a collection name MongoDB refuses.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A client of another (finished) loop cannot be used or closed here: start afresh.
            self._client = self._collections = None
            self._loop = loop
        if self._collections is None:
            client: AsyncMongoClient = AsyncMongoClient(self.cfg.uri or cosmos_uri(self.cfg), **client_options(self.cfg))
            database = client.get_default_database(default=self.cfg.name or DEFAULT_DATABASE)
            self._collections = (database[self.cfg.collection], database[self.cfg.collection + INSIGHTS_SUFFIX])
            self._client = client
        return self._collections

    async def _call(self, what: str, operation: Callable[[tuple[AsyncCollection, AsyncCollection]], Awaitable[T]]) -> T:
        """Await ``operation`` on (metas, insights), every pymongo error translated (:func:`translate`)."""
        with translated(translate, what):
            collections = self.open()
            await self._select_server()
            return await operation(collections)

    async def _select_server(self) -> None:
        """Wait for a server the operations can use (the primary) at most ``serverselectiontimeoutseconds``.

        With ``timeoutMS`` set (:func:`client_options`), pymongo waits for a server up to the call's whole
        remaining deadline and ignores ``serverSelectionTimeoutMS`` (``get_server_selection_timeout`` in
        ``pymongo/topology_shared.py``, 4.20): a call against a server that was down failed after
        ``sockettimeoutseconds`` (30 s), whatever the selection timeout said (0.3 s). Selecting first, with
        the selection timeout, takes no request once a server is known, and the operation then finds it.

        Raises:
            pymongo.errors.ServerSelectionTimeoutError: no usable server within the selection timeout.
        """
        topology = getattr(self._client, "_topology", None)  # pymongo's own, as the operations use it
        if topology is None:
            return
        await self._client.aconnect()
        await topology.select_server(writable_server_selector, "select server",
                                     server_selection_timeout=self.cfg.serverselectiontimeoutseconds)

    async def get_event_meta(self, event_id: str) -> EventMeta | None:
        """The event meta stored under ``event_id`` (its ``_id``), or None when there is none.

        Raises:
            DataPlaneUnavailable: the server cannot be reached (never answered as "not found").
            DataPlaneError: any other failure, including a stored document that is not an EventMeta.
        """
        where = f"event meta '{event_id}' in collection '{self.cfg.collection}'"
        doc = await self._call(f"reading {where}", lambda c: c[0].find_one({"_id": event_id}))
        return self._parse(EventMeta, doc, where)

    async def get_insight(self, execution_id: str) -> Insight | None:
        """The insight stored under ``execution_id``, or None; errors as :meth:`get_event_meta`."""
        where = f"insight '{execution_id}' in collection '{self.cfg.collection}{INSIGHTS_SUFFIX}'"
        doc = await self._call(f"reading {where}", lambda c: c[1].find_one({"_id": execution_id}))
        return self._parse(Insight, doc, where)

    @staticmethod
    def _parse(model: type[R], doc: dict | None, where: str) -> R | None:
        if doc is None:
            return None
        doc.pop("_id", None)
        return parse_record(model, doc, where)

    async def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        """Replace-or-insert each meta under ``_id = meta.id`` in one unordered bulk write.

        Raises:
            DataPlaneUnavailable / DataPlaneError: as the class describes; some metas may have been
            written, and a retry rewrites them all to the same single copies.
        """
        if not metas:
            return  # pymongo refuses an empty bulk write
        requests = [ReplaceOne({"_id": m.id}, {"_id": m.id, **m.model_dump(mode="json")}, upsert=True) for m in metas]
        what = f"upserting event metas {_names([m.id for m in metas])} into collection '{self.cfg.collection}'"
        await self._call(what, lambda c: c[0].bulk_write(requests, ordered=False))

    async def upsert_insight(self, insight: Insight) -> None:
        """Replace-or-insert the insight under ``_id = insight.id`` (the execution id)."""
        doc = {"_id": insight.id, **insight.model_dump(mode="json")}
        what = f"upserting insight '{insight.id}' into collection '{self.cfg.collection}{INSIGHTS_SUFFIX}'"
        await self._call(what, lambda c: c[1].replace_one({"_id": insight.id}, doc, upsert=True))

    async def close(self) -> None:
        """Close the client's connections and monitors, if this loop ever created it."""
        client, self._client, self._collections = self._client, None, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.close()
