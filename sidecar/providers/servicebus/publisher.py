"""The Azure Service Bus EventPublisher (``--servicebuseventprovider=true``), on ``azure-servicebus``.

Each child event becomes one message (``DESIGN.md``: Data plane records): body the event JSON,
``content_type`` ``application/json``, ``message_id`` the child event id (so Service Bus duplicate
detection drops a retried publish), ``correlation_id`` the correlation id, ``subject`` and the
application property ``eventType`` the event type, which subscriptions filter on. The events of one
``publish`` go out per topic in as few batches as the link's size limit allows
(``ServiceBusSender.create_message_batch``).

Waiting is bounded: ``azure-servicebus`` 7.x retries a refused connection for about 11 s with its
default ``retry_total=3``, and against a peer that accepts TCP but never speaks AMQP it waits forever,
even with ``send_messages(timeout=...)`` (measured; issue 4). So the SDK's own retries are off
(Prefect's task retries are the one retry layer) and every ``publish`` runs under a hard deadline,
``publishtimeoutseconds``; past it the half-open connection is torn down and the publish fails with
:class:`~sidecar.errors.DataPlaneTimeout` (HTTP 503, not retried). The done flow bounds the whole
publish step, task retries included, by the same deadline (``flows/done.py``), so the bound a user
sets is the bound the module sees.

Errors: authentication or authorization refused is a :class:`~sidecar.errors.DataPlaneError` (HTTP
502, not retried); connection failures, busy or throttled answers are ``DataPlaneUnavailable``. A
topic that does not exist is refused by Service Bus with ``amqp:not-found`` on the link, but
azure-servicebus 7.15 reports that as a failed send (``amqp:unknown-error``,
``ServiceBusConnectionError``), so it surfaces as ``DataPlaneUnavailable`` naming the topic.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusSender
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    MessagingEntityDisabledError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
)

from sidecar.dataplane.credentials import CredentialKind, ProviderCredential, token_credential
from sidecar.dataplane.errors import first_line, permanent, transient
from sidecar.dataplane.events import STORE, Deadline, OnPublished
from sidecar.errors import DataPlaneTimeout, DataPlaneUnavailable
from sidecar.models import Event
from sidecar.providers.servicebus.config import ServiceBusConfig

log = logging.getLogger(__name__)

# The topic setting that routes each event to the topic named after its event type.
PER_EVENT_TYPE = "{eventType}"
# Errors no retry can fix: bad credentials or rights, no such topic, an event too large for a message.
PERMANENT = (ServiceBusAuthenticationError, ServiceBusAuthorizationError, MessagingEntityNotFoundError,
             MessagingEntityDisabledError, MessageSizeExceededError)
# How long closing a connection after a failed publish may take, seconds: a peer that never answered
# will not answer the AMQP close either.
CLOSE_SECONDS = 2.0


def connection_string(cfg: ServiceBusConfig) -> str:
    """The SAS connection string for ``cfg``: ``connectionstring`` if set, else one built from
    ``namespace`` (a bare name means ``{namespace}.servicebus.windows.net``), ``authorizationrulename``
    and ``key``. Contains the key: never log it."""
    if cfg.connectionstring:
        return cfg.connectionstring
    host = cfg.namespace if "." in cfg.namespace else f"{cfg.namespace}.servicebus.windows.net"
    return f"Endpoint=sb://{host}/;SharedAccessKeyName={cfg.authorizationrulename};SharedAccessKey={cfg.key}"


def service_bus_client(cfg: ServiceBusConfig) -> ServiceBusClient:
    """The asyncio ``ServiceBusClient`` for ``cfg``: with the SAS key (:func:`connection_string`), or
    with a Microsoft Entra ID token credential (:mod:`sidecar.dataplane.credentials`), which the SDK
    sends on ``$cbs`` as a ``jwt`` put-token for the audience ``https://servicebus.azure.net``.

    With a token credential, a ``namespace`` with an explicit port (``localhost:5672``) is a local
    emulator spoken to over plain AMQP, as ``UseDevelopmentEmulator=true`` does in a connection
    string; any other namespace is reached over TLS on port 5671.
    ``retry_total=0``: Prefect's task retries are the one retry layer (flows/runtime.py).
    """
    if cfg.credential is CredentialKind.key:
        return ServiceBusClient.from_connection_string(connection_string(cfg), retry_total=0)
    host = cfg.namespace if "." in cfg.namespace or ":" in cfg.namespace else f"{cfg.namespace}.servicebus.windows.net"
    emulator = urlsplit(f"//{host}").port is not None
    return _TokenClient(host, token_credential(cfg.credential, cfg.clientid, STORE), retry_total=0,
                        **({"use_tls": False} if emulator else {}))


class _TokenClient(ServiceBusClient):
    """A ``ServiceBusClient`` that owns its token credential: closing it closes the credential's HTTP
    session too (the SDK leaves the credential to its caller)."""

    def __init__(self, host: str, credential: ProviderCredential, **kwargs: Any):
        super().__init__(host, credential, **kwargs)
        self.owned_credential = credential

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self.owned_credential.close()


def topic_of(cfg: ServiceBusConfig, event: Event) -> str:
    """The topic ``event`` goes to: ``cfg.topic``, or the event type when the topic is empty or
    ``{eventType}`` (Ion's dispatcher subscribes one topic per event type, one subscription per module)."""
    return event.type if cfg.topic in ("", PER_EVENT_TYPE) else cfg.topic


def to_message(event: Event) -> ServiceBusMessage:
    """The Service Bus message for ``event`` (module docstring)."""
    return ServiceBusMessage(
        event.model_dump_json(),
        content_type="application/json",
        message_id=event.id,
        correlation_id=event.context.correlationId,
        subject=event.type,
        application_properties={"eventType": event.type},
    )


class ServiceBusEventPublisher:
    """EventPublisher on Azure Service Bus topics (the SDK's asyncio client, pure-Python AMQP).

    One ``ServiceBusClient`` and one sender per topic are opened on first use and kept across
    publishes (a retried ``/done`` reuses them); any failed publish closes them all, so the next
    attempt starts from fresh connections.

    Args:
        cfg: the ``servicebuseventprovider`` settings; ``publishtimeoutseconds`` bounds each
            :meth:`publish` as a whole (connecting, authenticating, every batch), seconds.
    """

    def __init__(self, cfg: ServiceBusConfig):
        self.cfg = cfg
        # The done flow bounds its whole publish step, task retries included, by the same deadline.
        self.deadline = Deadline(cfg.publishtimeoutseconds, "servicebuseventprovider.publishtimeoutseconds")
        self._client: ServiceBusClient | None = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return f"Azure Service Bus, topic '{self.cfg.topic or PER_EVENT_TYPE}'"

    def destination(self, event: Event) -> str:
        return f"topic '{topic_of(self.cfg, event)}'"

    async def publish(self, events: list[Event], on_published: OnPublished | None = None) -> None:
        """Publish ``events``, each to its topic (:func:`topic_of`), in as few batches as fit.

        Partial success is possible (an earlier topic or batch went out); ``on_published`` is called
        with the ids of each batch right after Service Bus accepted it, so the caller can record what
        went out. Publishing the same events again is safe where Service Bus drops a message id it has
        seen (duplicate detection).

        Raises:
            DataPlaneUnavailable: the bus did not answer within ``publishtimeoutseconds``, refused
                the connection, or failed transiently (busy, quota, connection lost); names the topic.
            DataPlaneError: authentication or authorization refused, the topic does not exist or is
                disabled, an event does not fit in a message, or the connection settings are invalid.
        """
        if not events:
            return
        by_topic: dict[str, list[Event]] = {}
        for event in events:
            by_topic.setdefault(topic_of(self.cfg, event), []).append(event)
        current = [""]  # the topic being published to, for error messages
        work = asyncio.ensure_future(self._send_all(by_topic, current, on_published))
        try:
            finished, _ = await asyncio.wait({work}, timeout=self.cfg.publishtimeoutseconds)
        except asyncio.CancelledError:
            await self._abandon(work)
            raise
        if not finished:
            await self._abandon(work)
            raise DataPlaneTimeout(
                STORE, f"publishing to topic '{current[0]}' did not finish within "
                       f"{self.cfg.publishtimeoutseconds:g} s (servicebuseventprovider.publishtimeoutseconds)")
        exc = work.exception()
        if exc is not None:
            # A failed send can leave a broken link behind: the next attempt starts afresh.
            await self._discard()
            error = translate(exc, f"topic '{current[0]}'") if isinstance(exc, Exception) else exc
            if error is exc:
                raise exc
            raise error from exc

    async def _send_all(self, by_topic: dict[str, list[Event]], current: list[str],
                        on_published: OnPublished | None) -> None:
        for topic, group in by_topic.items():
            current[0] = topic
            await self._send(topic, group, on_published or (lambda ids: None))

    async def _abandon(self, work: asyncio.Future) -> None:
        """Stop the publish ``work`` that outlived its deadline, leaving no connection open.

        The sockets are aborted first: a pending read then fails and the SDK unwinds by itself.
        Cancelling alone is not enough with azure-servicebus 7.15: an open cancelled before the AMQP
        session began leaks its socket (``AMQPClientAsync.close_async`` returns early without a
        session, so the connection is never closed).
        """
        for sender in self._senders.values():
            connection = getattr(getattr(sender, "_handler", None), "_connection", None)
            writer = getattr(getattr(connection, "_transport", None), "writer", None)
            if writer is not None:
                writer.transport.abort()
        work.cancel()
        await asyncio.wait({work}, timeout=CLOSE_SECONDS)
        if work.done() and not work.cancelled():
            work.exception()  # retrieved: the deadline error is what the caller gets
        await self._discard()

    async def _send(self, topic: str, events: list[Event], on_published: OnPublished) -> None:
        sender = await self._sender(topic)
        batch = await sender.create_message_batch()
        ids: list[str] = []
        for event in events:
            message = to_message(event)
            try:
                batch.add_message(message)
                ids.append(event.id)
                continue
            except MessageSizeExceededError:
                if len(batch) == 0:
                    raise
            await sender.send_messages(batch)
            on_published(ids)
            batch = await sender.create_message_batch()
            batch.add_message(message)
            ids = [event.id]
        if len(batch):
            await sender.send_messages(batch)
            on_published(ids)
        log.debug("published %d events to topic %s", len(events), topic)

    async def _sender(self, topic: str) -> ServiceBusSender:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Connections belong to the event loop that opened them; never reuse them on another.
            self._client, self._senders, self._loop = None, {}, loop
        if self._client is None:
            self._client = service_bus_client(self.cfg)
        sender = self._senders.get(topic)
        if sender is None:
            sender = self._senders[topic] = self._client.get_topic_sender(topic_name=topic)
        return sender

    async def _discard(self) -> None:
        """Close every sender and the client, each bounded by ``CLOSE_SECONDS``; never raises."""
        handlers: list[Any] = [*self._senders.values(), *([self._client] if self._client else [])]
        self._client, self._senders = None, {}
        for handler in handlers:
            try:
                await asyncio.wait_for(handler.close(), CLOSE_SECONDS)
            except Exception as exc:  # closing is best effort; the publish error is what matters
                log.debug("closing %s failed: %r", type(handler).__name__, exc)

    async def close(self) -> None:
        """Close the senders and the client (connections)."""
        await self._discard()


def translate(exc: Exception, where: str) -> BaseException:
    """The event bus's error for azure-servicebus's ``exc`` while publishing ``where`` (``topic 'x'``),
    in the shape of ``sidecar.dataplane.errors``, or ``exc`` itself when it is no service error."""
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, DataPlaneUnavailable):
        # The token credential could not get a token (credentials.ProviderCredential); the SDK wrapped it.
        return inner
    if isinstance(exc, PERMANENT):
        return permanent(STORE, where, exc)
    if isinstance(exc, ServiceBusError):
        return transient(STORE, where, exc)
    if isinstance(exc, ValueError):
        # The SDK parses the connection string lazily; its message does not echo the string.
        return permanent(STORE, where, text=f"{where}: invalid settings: {first_line(exc)}")
    return exc
