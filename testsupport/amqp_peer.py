"""A test stand-in for Microsoft's Azure Service Bus emulator: an AMQP 1.0 peer on python-qpid-proton.

This is a test fixture, not part of the product. Microsoft's Service Bus emulator ships only as a
container image and no Docker engine runs where these tests run, so this peer implements exactly the
part of Service Bus that ``azure-servicebus`` (its pure-Python AMQP transport) uses to send to a topic
and to receive from a subscription, when the connection string carries ``UseDevelopmentEmulator=true``
(plain AMQP, no TLS, custom port):

- SASL ANONYMOUS on plain TCP;
- claims-based security: ``put-token`` requests on the ``$cbs`` node, answered on the ``$cbs``
  receiver link with ``correlation_id`` = the request's ``message_id`` and application properties
  ``status-code``/``status-description``. The token is checked as Service Bus checks a SAS token
  (HMAC-SHA256 of ``quote_plus(uri) + "\\n" + expiry`` with the named key, not expired), so a wrong
  key name or key is refused with 401, and a token for an entity that does not exist with 404 (as
  Service Bus answers: "The messaging entity '...' could not be found."). A put-token carrying a JWT (a Microsoft Entra ID access token,
  what the SDK sends with a token credential) is accepted only when :attr:`AmqpPeer.jwt_verify`
  accepts it (signature, audience ``https://servicebus.azure.net``, issuer, lifetime), else 401;
- topics fanning out to subscriptions, both declared up front with :meth:`AmqpPeer.create_topic` (as
  the emulator's ``Config.json`` does); senders attach to ``amqps://HOST:PORT/<topic>``, receivers to
  ``amqps://HOST:PORT/<topic>/Subscriptions/<name>``; an unknown entity is refused with
  ``amqp:not-found``. The sender link advertises ``max_message_size`` and the vendor property
  ``com.microsoft:max-message-batch-size`` (both :attr:`AmqpPeer.max_message_size`);
- batches: the SDK sends a batch as one transfer with message format 0x80013700 whose body is one
  Data section per encoded message. proton does not expose a transfer's message format, so a transfer
  whose every Data section holds an encoded AMQP message (it starts with a section descriptor, which
  no JSON or text body does) is taken as a batch and split;
- duplicate detection by ``message_id`` per topic (Service Bus's ``requiresDuplicateDetection``, on by
  default with an unbounded window; ``create_topic(..., duplicate_detection=False)`` turns it off, as
  on a topic created without it): a repeated message id is accepted and dropped, and counted in
  :attr:`Topic.duplicates`;
- receivers: peek-lock deliveries carry 16-byte delivery tags (the SDK reads them as lock tokens) and
  the outcome the receiver sends (complete = accepted, abandon = released/modified) is echoed back
  settled, which the SDK waits for; a receive-and-delete receiver gets pre-settled deliveries; a drain
  request uses up the credit left. Locked messages of a receiver that goes away return to its
  subscription.

Not implemented: sessions, the ``$management`` node (peek, lock renewal, scheduling), rules and
filters, dead-lettering, TTL and lock expiry. :attr:`Topic.transfers` records how many messages each
accepted transfer carried, so tests can assert how many batches a publish took.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs, quote_plus, urlparse

from proton import Condition, Data, Delivery, Described, Handler, Link, Message, symbol, ulong
from proton.handlers import FlowController
from proton.reactor import ApplicationEvent, Container, EventInjector

# Described-type codes of the AMQP 1.0 message sections (spec part 3.2): header .. footer.
SECTION_CODES = range(0x70, 0x79)
DATA_SECTION = 0x75
CBS = "$cbs"
EMULATOR_KEYS = {"RootManageSharedAccessKey": "SAS_KEY_VALUE"}


@dataclass
class Subscription:
    """A subscription: messages waiting, receiver links attached, and messages locked by them."""

    name: str
    queue: deque[bytes] = field(default_factory=deque)
    receivers: list[Link] = field(default_factory=list)


@dataclass
class Topic:
    """A topic: its subscriptions and what the duplicate detection and the tests need."""

    name: str
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    seen_ids: set[str] = field(default_factory=set)
    transfers: list[int] = field(default_factory=list)  # messages carried by each accepted transfer
    duplicates: int = 0
    duplicate_detection: bool = True


def _sections(payload: bytes) -> list[Described] | None:
    """The AMQP sections of an encoded message, or None when ``payload`` is not one."""
    sections = []
    rest = memoryview(payload)
    while rest:
        if rest[0] != 0x00:  # every section is a described type
            return None
        data = Data()
        try:
            used = data.decode(bytes(rest))
        except Exception:
            return None
        data.rewind()
        data.next()
        value = data.get_object()
        if not isinstance(value, Described) or value.descriptor not in SECTION_CODES:
            return None
        # A binary value is a view into ``data``'s buffer: copy it before ``data`` is freed.
        body = bytes(value.value) if isinstance(value.value, memoryview) else value.value
        sections.append(Described(value.descriptor, body))
        rest = rest[used:]
    return sections


def split_transfer(payload: bytes) -> list[bytes]:
    """The messages one transfer carries: the encoded messages of a batch, else ``[payload]``."""
    sections = _sections(payload)
    bodies = [s.value for s in sections or [] if s.descriptor == DATA_SECTION]
    if bodies and all(_sections(b) for b in bodies):
        return bodies
    return [payload]


def check_sas_token(token: str, keys: dict[str, str]) -> str | None:
    """None when ``token`` is a valid, unexpired SAS token signed with one of ``keys`` (name ->
    key), else why not. Format and signature as Azure documents for SAS tokens."""
    if not token.startswith("SharedAccessSignature "):
        return "not a shared access signature"
    fields = {k: v[0] for k, v in parse_qs(token.split(" ", 1)[1]).items()}
    key = keys.get(fields.get("skn", ""))
    if key is None:
        return "unknown shared access key name"
    signed = f"{quote_plus(fields.get('sr', ''))}\n{fields.get('se', '')}".encode()
    expected = base64.b64encode(hmac.new(key.encode(), signed, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, fields.get("sig", "")):
        return "invalid signature"
    if int(fields.get("se", "0")) < time.time():
        return "token expired"
    return None


def emulator_connection_string(port: int, key_name: str = "RootManageSharedAccessKey",
                               key: str = "SAS_KEY_VALUE") -> str:
    """A connection string as for the Service Bus emulator on ``127.0.0.1:port`` (plain AMQP)."""
    return (f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName={key_name};SharedAccessKey={key};"
            "UseDevelopmentEmulator=true")


class _Broker(Handler):
    """The proton event handler; runs on the container's thread only."""

    def __init__(self, peer: "AmqpPeer"):
        super().__init__()
        self.peer = peer
        self.handlers = [FlowController(window=100)]
        self.acceptor = None
        self.connections: list = []

    # -- connection and session life cycle -----------------------------------------------------

    def on_connection_bound(self, event) -> None:
        sasl = event.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")

    def on_connection_remote_open(self, event) -> None:
        event.connection.open()
        self.connections.append(event.connection)
        self.peer.accepted += 1

    def on_session_remote_open(self, event) -> None:
        event.session.open()

    def on_connection_remote_close(self, event) -> None:
        event.connection.close()

    def on_session_remote_close(self, event) -> None:
        event.session.close()

    def on_transport_closed(self, event) -> None:
        connection = event.connection
        if connection is None:
            return
        link = connection.link_head(0)
        while link:
            self._detach(link)
            link = link.next(0)
        if connection in self.connections:
            self.connections.remove(connection)

    # -- links -----------------------------------------------------------------------------------

    def on_link_remote_open(self, event) -> None:
        link = event.link
        address = (link.remote_target if link.is_receiver else link.remote_source).address or ""
        link.entity = None
        if address == CBS:
            link.entity = CBS
        else:
            entity = self.peer.entity(address)
            if link.is_receiver and isinstance(entity, Topic) or link.is_sender and isinstance(entity, Subscription):
                link.entity = entity
        if link.entity is None:
            # Refused as AMQP 1.0 (2.6.3) says: attach with a null terminus, then detach with the error.
            link.open()
            link.condition = Condition("amqp:not-found", f"no messaging entity at '{address}'")
            link.close()
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if link.is_receiver:
            link.max_message_size = self.peer.max_message_size
            link.properties = {symbol("com.microsoft:max-message-batch-size"): ulong(self.peer.max_message_size)}
        else:
            link.snd_settle_mode = link.remote_snd_settle_mode
            link.rcv_settle_mode = link.remote_rcv_settle_mode
            link.locked = {}
            if isinstance(link.entity, Subscription):
                link.entity.receivers.append(link)
        link.open()

    def on_link_remote_close(self, event) -> None:
        self._detach(event.link)
        event.link.close()

    def _detach(self, link: Link) -> None:
        """Forget ``link``; messages it holds locked go back to their subscription."""
        entity = getattr(link, "entity", None)
        if isinstance(entity, Subscription) and link in entity.receivers:
            entity.receivers.remove(link)
            for payload in reversed(list(link.locked.values())):
                entity.queue.appendleft(payload)
            link.locked.clear()
            self._dispatch(entity)

    # -- deliveries ------------------------------------------------------------------------------

    def on_delivery(self, event) -> None:
        delivery = event.delivery
        link = delivery.link
        if link.is_receiver:
            if delivery.readable and not delivery.partial:
                payload = link.recv(delivery.pending)
                link.advance()
                outcome = self._incoming(link, payload)
                delivery.update(outcome)
                delivery.settle()
        elif delivery.updated:
            self._settled_by_receiver(link, delivery)

    def _incoming(self, link: Link, payload: bytes) -> int:
        if link.entity == CBS:
            self._put_token(link, payload)
            return Delivery.ACCEPTED
        if link.entity is None:  # a refused link; the SDK may send on it before the detach arrives
            return Delivery.REJECTED
        topic: Topic = link.entity
        messages = split_transfer(payload)
        with self.peer.lock:
            topic.transfers.append(len(messages))
            for encoded in messages:
                message = Message()
                message.decode(encoded)
                if message.id is not None and str(message.id) in topic.seen_ids:
                    topic.duplicates += 1
                    if topic.duplicate_detection:
                        continue
                if message.id is not None:
                    topic.seen_ids.add(str(message.id))
                for sub in topic.subscriptions.values():
                    sub.queue.append(encoded)
            subscriptions = list(topic.subscriptions.values())
        for sub in subscriptions:
            self._dispatch(sub)
        return Delivery.ACCEPTED

    def _put_token(self, link: Link, payload: bytes) -> None:
        if self.peer.stall_tokens:
            return
        request = Message()
        request.decode(payload)
        token = str(request.body)
        # Told apart by content, not by the "type" property: azure-servicebus 7.15 sends SAS tokens
        # with type "jwt" too (its pyamqp transport drops the sastoken type on that path).
        kind = "sas" if token.startswith("SharedAccessSignature ") else "jwt"
        problem = check_sas_token(token, self.peer.keys) if kind == "sas" else self.peer.check_jwt(token)
        self.peer.put_tokens.append((kind, problem))
        status, description = (200, "OK") if problem is None else (401, problem)
        audience = str((request.properties or {}).get("name") or "")
        if (problem is None and self.peer.token_entity_check and urlparse(audience).path.strip("/")
                and self.peer.entity(audience) is None):
            # Service Bus checks the entity a token is for: "Put token failed. status-code: 404,
            # status-description: The messaging entity '...' could not be found."
            status, description = 404, f"The messaging entity '{audience}' could not be found."
        reply = Message(correlation_id=request.id,
                        properties={"status-code": status, "status-description": description})
        replier = next((l for l in self._links(link.connection) if l.is_sender and l.entity == CBS), None)
        if replier is not None:
            replier.send(reply)

    @staticmethod
    def _links(connection):
        link = connection.link_head(0)
        while link:
            yield link
            link = link.next(0)

    def on_link_flow(self, event) -> None:
        link = event.link
        entity = getattr(link, "entity", None)
        if isinstance(entity, Subscription):
            self._dispatch(entity)
            if link.drain_mode:
                # The receiver asked to drain (the SDK does before closing): use up the credit left.
                link.drained()

    def _dispatch(self, sub: Subscription) -> None:
        """Hand waiting messages of ``sub`` to its receivers, as far as their credit goes."""
        for link in list(sub.receivers):
            while link.credit > 0 and sub.queue:
                payload = sub.queue.popleft()
                tag = uuid.uuid4().bytes  # 16 bytes: the SDK reads the delivery tag as the lock token
                delivery = link.delivery(tag)
                link.stream(payload)
                link.advance()
                if link.snd_settle_mode == Link.SND_SETTLED:
                    delivery.settle()
                else:
                    link.locked[tag] = payload
                    delivery.lock = tag

    def _settled_by_receiver(self, link: Link, delivery: Delivery) -> None:
        """Echo the receiver's outcome, settled; released or modified messages are delivered again."""
        state = delivery.remote_state
        if state not in (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED):
            return
        payload = link.locked.pop(getattr(delivery, "lock", None), None)
        delivery.update(state)
        delivery.settle()
        if payload is not None and state in (Delivery.RELEASED, Delivery.MODIFIED):
            sub: Subscription = link.entity
            sub.queue.appendleft(payload)
            self._dispatch(sub)

    # -- start and stop --------------------------------------------------------------------------

    def on_reactor_init(self, event) -> None:
        self.acceptor = event.container.listen(f"127.0.0.1:{self.peer.port}")
        self.peer.started.set()

    def on_peer_stop(self, event) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
        for connection in list(self.connections):
            connection.close()
        self.peer.injector.close()
        self.peer._container.stop()


class AmqpPeer:
    """The peer on ``127.0.0.1:port``, run by a proton container on a daemon thread.

    Args:
        port: the TCP port to listen on (see ``testsupport.processes.free_port``).
        keys: shared access key name -> key accepted in SAS tokens; default the emulator's
            ``RootManageSharedAccessKey``/``SAS_KEY_VALUE``.
        max_message_size: the largest transfer (and so batch) accepted, bytes; default 256 KiB,
            Service Bus standard tier.
    """

    def __init__(self, port: int, keys: dict[str, str] | None = None, max_message_size: int = 256 * 1024):
        self.port = port
        self.keys = dict(EMULATOR_KEYS if keys is None else keys)
        self.max_message_size = max_message_size
        # True: put-token requests are never answered, a broker that speaks AMQP but stalls.
        self.stall_tokens = False
        # False: a put-token for an entity that does not exist is accepted, so the link attach is what
        # refuses it (amqp:not-found), as Service Bus does for an entity deleted after the token was put.
        self.token_entity_check = True
        # Checks a JWT put-token (raises when it is not acceptable); None: JWTs are refused.
        self.jwt_verify: Callable[[str], object] | None = None
        # ("sas" or "jwt", why refused or None) of every put-token answered, in order.
        self.put_tokens: list[tuple[str, str | None]] = []
        self.accepted = 0  # AMQP connections opened so far
        self.lock = threading.Lock()
        self.topics: dict[str, Topic] = {}
        self.started = threading.Event()
        self.injector = EventInjector()
        self.error: BaseException | None = None
        self._broker = _Broker(self)
        self._container = Container(self._broker)
        self._container.selectable(self.injector)
        self._thread = threading.Thread(target=self._run, name=f"amqp-peer-{port}", daemon=True)

    def connection_string(self, key_name: str = "RootManageSharedAccessKey", key: str = "SAS_KEY_VALUE") -> str:
        """The emulator-style connection string the SDK uses to reach this peer."""
        return emulator_connection_string(self.port, key_name, key)

    def check_jwt(self, token: str) -> str | None:
        """None when :attr:`jwt_verify` accepts the JWT ``token``, else why not."""
        if self.jwt_verify is None:
            return "JWT tokens are not accepted here"
        try:
            self.jwt_verify(token)
        except Exception as exc:  # noqa: BLE001 - any refusal is a 401 with its reason
            return f"invalid JWT: {type(exc).__name__}: {exc}"
        return None

    def _run(self) -> None:
        try:
            self._container.run()
        except BaseException as exc:  # recorded so start() and tests can report it
            traceback.print_exc()
            self.error = exc
            self.started.set()

    def start(self, timeout: float = 10) -> "AmqpPeer":
        """Listen and serve on a background thread; raises if the listener did not come up."""
        self._thread.start()
        if not self.started.wait(timeout) or self.error is not None:
            raise RuntimeError(f"AMQP peer did not start on 127.0.0.1:{self.port}: {self.error!r}")
        return self

    def stop(self, timeout: float = 10) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._thread.is_alive():
            self.injector.trigger(ApplicationEvent("peer_stop"))
            self._thread.join(timeout)

    @property
    def open_connections(self) -> int:
        """AMQP connections open right now."""
        return len(self._broker.connections)

    def create_topic(self, name: str, subscriptions: list[str] = ("sub",), duplicate_detection: bool = True) -> Topic:
        """Declare topic ``name`` with ``subscriptions`` (as in the emulator's ``Config.json``).

        ``duplicate_detection=False``: every message is delivered, repeated message ids too (still
        counted in :attr:`Topic.duplicates`), as on a topic without ``requiresDuplicateDetection``."""
        with self.lock:
            topic = self.topics.setdefault(name, Topic(name, duplicate_detection=duplicate_detection))
            for sub in subscriptions:
                topic.subscriptions.setdefault(sub, Subscription(sub))
            return topic

    def entity(self, address: str) -> Topic | Subscription | None:
        """The topic or subscription an attach address names (``.../<topic>[/Subscriptions/<sub>]``)."""
        parts = urlparse(address).path.strip("/").split("/") if "://" in address else address.strip("/").split("/")
        with self.lock:
            topic = self.topics.get(parts[0])
            if topic is None:
                return None
            if len(parts) == 1:
                return topic
            if len(parts) == 3 and parts[1].lower() == "subscriptions":
                return topic.subscriptions.get(parts[2])
            return None
