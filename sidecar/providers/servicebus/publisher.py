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
topic that does not exist is refused by Service Bus at its put-token (404, "The messaging entity '...'
could not be found.") or its link attach (``amqp:not-found``): a ``DataPlaneError`` saying the topic
was not found (:func:`_not_found`). A not-found that reaches azure-servicebus 7.15 only as the detach of
a link it already sent on is reported by the SDK as a failed send (``amqp:unknown-error``,
``ServiceBusConnectionError``); the link's own error is kept (:func:`_keep_link_error`) to name it.
Topic names are checked before anything is committed (``sidecar.dataplane.topics``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable
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
from sidecar.dataplane.topics import PER_EVENT_TYPE, topic_for
from sidecar.errors import DataPlaneTimeout, DataPlaneUnavailable
from sidecar.models import Event
from sidecar.providers.servicebus.config import ServiceBusConfig

log = logging.getLogger(__name__)

# Errors no retry can fix: bad credentials or rights, no such topic, an event too large for a message.
PERMANENT = (ServiceBusAuthenticationError, ServiceBusAuthorizationError, MessagingEntityNotFoundError,
             MessagingEntityDisabledError, MessageSizeExceededError)
# How long closing a connection after a failed publish may take, seconds: a peer that never answered
# will not answer the AMQP close either.
CLOSE_SECONDS = 2.0


def _ignore(ids: list[str]) -> None:
    """The callback a caller did not pass."""


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
    return topic_for(cfg.topic, event.type)


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

    async def publish(self, events: list[Event], on_published: OnPublished | None = None,
                      on_sending: OnPublished | None = None) -> None:
        """Publish ``events``, each to its topic (:func:`topic_of`), in as few batches as fit.

        Partial success is possible (an earlier topic or batch went out); ``on_sending`` is called with
        the ids of each batch right before its transfer (the link is open by then: a refused connection
        or sign-in fails before it), ``on_published`` right after Service Bus accepted it, so the caller
        can record what went out and what may have. Publishing the same events again is safe where Service Bus drops a message id it has
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
        # The batches go out on a task of their own, which the caller's cancellation (SIGTERM, the flow's
        # deadline) reaches only once it is running again: a batch started in between would go out and
        # be cut off before its answer ("may have been delivered"). So each batch first checks that no
        # cancellation of the caller was requested since this publish began.
        caller = asyncio.current_task()
        baseline = caller.cancelling() if caller is not None else 0

        def halted() -> bool:
            return caller is not None and caller.cancelling() > baseline

        work = asyncio.ensure_future(self._send_all(by_topic, current, on_published, on_sending, halted))
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
            link_error = getattr(self._senders.get(current[0]), "link_error", None)
            # A failed send can leave a broken link behind: the next attempt starts afresh.
            await self._discard()
            error = translate(exc, f"topic '{current[0]}'", link_error) if isinstance(exc, Exception) else exc
            if error is exc:
                raise exc
            raise error from exc

    async def _send_all(self, by_topic: dict[str, list[Event]], current: list[str],
                        on_published: OnPublished | None, on_sending: OnPublished | None,
                        halted: Callable[[], bool]) -> None:
        for topic, group in by_topic.items():
            current[0] = topic
            await self._send(topic, group, on_published or _ignore, on_sending or _ignore, halted)

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

    async def _send(self, topic: str, events: list[Event], on_published: OnPublished,
                    on_sending: OnPublished, halted: Callable[[], bool]) -> None:
        sender = await self._sender(topic)
        batch = await sender.create_message_batch()
        ids: list[str] = []

        async def send() -> None:
            if halted():  # the caller is being cancelled: no new batch, whose answer it would not wait for
                raise asyncio.CancelledError("publish cancelled before its next batch")
            on_sending(ids)
            await sender.send_messages(batch)
            on_published(ids)

        for event in events:
            message = to_message(event)
            try:
                batch.add_message(message)
                ids.append(event.id)
                continue
            except MessageSizeExceededError:
                if len(batch) == 0:
                    raise
            await send()
            batch = await sender.create_message_batch()
            batch.add_message(message)
            ids = [event.id]
        if len(batch):
            await send()
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
            _keep_link_error(sender)
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

    async def check_topics(self, event_types: list[str]) -> bool | None:
        """Log once whether the topics ``event_types`` go to have duplicate detection, read with the
        Service Bus administration client (``TopicProperties.requires_duplicate_detection``; the ATOM
        management API over HTTPS, which needs the Manage right). Never raises: a read that is refused
        (a Send-only rule, a token without the right), fails or takes longer than
        :data:`MANAGEMENT_SECONDS` (or ``publishtimeoutseconds`` if shorter) is logged as not known.

        Without duplicate detection a publish whose outcome the sidecar never learns (a timeout, a lost
        connection, a killed sidecar), retried by the module's ``/done``, delivers its events twice
        (README: The one window left). Returns True when every topic has it, False when one has not,
        None when not known (or no topic is known before the first event)."""
        topics = sorted({topic_for(self.cfg.topic, t) for t in event_types})
        if not topics:
            return None
        without: list[str] = []
        credential = None
        seconds = min(MANAGEMENT_SECONDS, self.cfg.publishtimeoutseconds)
        try:
            async with asyncio.timeout(seconds):
                if self.cfg.credential is not CredentialKind.key:
                    credential = token_credential(self.cfg.credential, self.cfg.clientid, STORE)
                async with _administration_client(self.cfg, credential) as admin:
                    for topic in topics:
                        if not (await admin.get_topic(topic)).requires_duplicate_detection:
                            without.append(topic)
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - any failure only means "not known"
            why = f"no answer within {seconds:g} s" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {first_line(exc)}"
            log.warning("could not read whether topic %s has duplicate detection (%s): if it has not, a /done "
                        "retried after a publish whose outcome was never known (a timeout, a lost connection, a "
                        "killed sidecar) delivers those events twice; consumers dedupe on the message id (the "
                        "child event id)", ", ".join(topics), why)
            return None
        finally:
            if credential is not None:
                await credential.close()
        if without:
            log.warning("topic %s has no duplicate detection (requiresDuplicateDetection is off): a /done retried "
                        "after a publish whose outcome was never known (a timeout, a lost connection, a killed "
                        "sidecar) delivers those events twice; enable it, or have consumers dedupe on the message "
                        "id (the child event id)", ", ".join(without))
            return False
        log.info("topic %s has duplicate detection: a retried publish is dropped by Service Bus", ", ".join(topics))
        return True


# How long the start-up read of the topics' duplicate detection may take, seconds (the service answers
# in well under a second; a bus that never answers must not hold a connection for long).
MANAGEMENT_SECONDS = 5.0


def _administration_client(cfg: ServiceBusConfig, credential: ProviderCredential | None) -> Any:
    """The asyncio ``ServiceBusAdministrationClient`` for ``cfg``: the SAS key (:func:`connection_string`),
    or ``credential`` for a token credential (closed by the caller), without the SDK's own retries."""
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    if credential is None:
        return ServiceBusAdministrationClient.from_connection_string(connection_string(cfg), retry_total=0)
    host = cfg.namespace if "." in cfg.namespace or ":" in cfg.namespace else f"{cfg.namespace}.servicebus.windows.net"
    return ServiceBusAdministrationClient(host, credential, retry_total=0)


def translate(exc: Exception, where: str, link_error: Exception | None = None) -> BaseException:
    """The event bus's error for azure-servicebus's ``exc`` while publishing ``where`` (``topic 'x'``),
    in the shape of ``sidecar.dataplane.errors``, or ``exc`` itself when it is no service error.
    ``link_error``: the error the sender's link was detached with, if any (:func:`_keep_link_error`)."""
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, DataPlaneUnavailable):
        # The token credential could not get a token (credentials.ProviderCredential); the SDK wrapped it.
        return inner
    missing = _not_found(exc) or (_not_found(link_error, link_error) if link_error is not None else None)
    if missing is not None:
        return permanent(STORE, where, text=f"{where} was not found: Service Bus answered {missing}; create the "
                                            "topic or change --servicebuseventprovider.topic")
    if isinstance(exc, PERMANENT):
        return permanent(STORE, where, exc)
    if isinstance(exc, ServiceBusError):
        return transient(STORE, where, exc)
    if isinstance(exc, ValueError):
        # The SDK parses the connection string lazily; its message does not echo the string.
        return permanent(STORE, where, text=f"{where}: invalid settings: {first_line(exc)}")
    return exc


def _keep_link_error(sender: ServiceBusSender) -> None:
    """Keep on ``sender`` (``link_error``) the error its link was detached with when a send fails.

    A topic deleted after the token was put is refused at the link attach with ``amqp:not-found``;
    azure-servicebus 7.15 then reports the send as ``amqp:unknown-error`` (the delivery was "not
    delivered") and drops the link and its error when it closes the handler. Its ``_handle_exception``
    (private) runs first, with the link still there; without that method nothing is kept."""
    original = getattr(sender, "_handle_exception", None)
    if original is None:
        return

    async def handle(exception: Exception) -> Any:
        link = getattr(getattr(sender, "_handler", None), "_link", None)
        error = getattr(link, "_error", None)
        if error is not None:
            sender.link_error = error  # type: ignore[attr-defined]
        return await original(exception)

    sender._handle_exception = handle  # type: ignore[method-assign]


def _not_found(exc: Exception, inner: Any = None) -> str | None:
    """What Service Bus said when ``exc`` means the entity does not exist, else None.

    Service Bus refuses a missing topic in one of two places: the claims-based security put-token for
    the entity's address ("Put token failed. status-code: 404, status-description: The messaging entity
    '...' could not be found."), which azure-servicebus 7.15 raises as ``ServiceBusAuthenticationError``
    ("Error condition: amqp:client-error", the 404 only in its inner ``TokenAuthFailure``), or the link
    attach (``amqp:not-found``, ``MessagingEntityNotFoundError`` where the SDK keeps it; the link's own
    error, passed as ``inner``, where it does not)."""
    inner = inner if inner is not None else getattr(exc, "inner_exception", None)
    if getattr(inner, "status_code", None) == 404:
        description = getattr(inner, "status_description", b"") or b""
        text = description.decode("utf-8", "replace") if isinstance(description, bytes) else str(description)
        return f"404 {text}".strip()
    condition = getattr(inner, "condition", None)
    condition = getattr(condition, "value", condition)
    if isinstance(exc, MessagingEntityNotFoundError) or condition in (b"amqp:not-found", "amqp:not-found"):
        description = getattr(inner, "description", None)
        text = description.decode("utf-8", "replace") if isinstance(description, bytes) else description
        return f"amqp:not-found {text or first_line(exc)}".strip()
    return None
