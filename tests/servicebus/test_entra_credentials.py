"""The Service Bus publisher with a Microsoft Entra ID token credential (issue 12), for real.

azure-identity's ``ManagedIdentityCredential`` gets a JWT from a managed identity endpoint on loopback
(App Service style ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``, ``testsupport/identity.py``); the SDK sends it
on ``$cbs`` as a ``jwt`` put-token, and the AMQP peer verifies it (signature with the endpoint's key,
audience, issuer, lifetime) before the publisher may send.
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from sidecar.cli import UsageError, compose_config
from sidecar.dataplane.credentials import CredentialKind
from sidecar.providers.servicebus.config import ServiceBusConfig
from sidecar.providers.servicebus.publisher import ServiceBusEventPublisher
from sidecar.errors import DataPlaneError, DataPlaneUnavailable
from testsupport.amqp_peer import AmqpPeer
from testsupport.identity import SERVICE_BUS_AUDIENCE, IdentityEndpoint
from testsupport.processes import free_port
from testsupport.servicebus import make_events, receive_all_sync, unique


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[IdentityEndpoint]:
    endpoint = IdentityEndpoint()
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def jwt_peer() -> Iterator[AmqpPeer]:
    """A peer of its own: tests here set which identity's tokens it accepts."""
    peer = AmqpPeer(free_port()).start()
    yield peer
    peer.stop()


def token_publisher(peer: AmqpPeer, topic: str, clientid: str = "", deadline: float = 20,
                    kind: CredentialKind = CredentialKind.managedidentity) -> ServiceBusEventPublisher:
    # An explicit port: the local emulator over plain AMQP (servicebus.service_bus_client).
    return ServiceBusEventPublisher(ServiceBusConfig(
        enabled=True, namespace=f"127.0.0.1:{peer.port}", topic=topic, credential=kind,
        clientid=clientid, publishtimeoutseconds=deadline))


async def publish_and_close(publisher: ServiceBusEventPublisher, events: list) -> None:
    try:
        await publisher.publish(events)
    finally:
        await publisher.close()


# DefaultAzureCredential finds the same managed identity endpoint through its chain.
@pytest.mark.parametrize("kind", [CredentialKind.managedidentity, CredentialKind.default])
def test_publisher_sends_with_a_managed_identity_jwt(jwt_peer: AmqpPeer, identity: IdentityEndpoint,
                                                     kind: CredentialKind, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    jwt_peer.jwt_verify = lambda token: identity.verify(token, SERVICE_BUS_AUDIENCE)
    topic = unique("entra")
    jwt_peer.create_topic(topic)
    events = make_events(3, ["file_discovered"])
    before = len(jwt_peer.put_tokens)
    asyncio.run(publish_and_close(token_publisher(jwt_peer, topic, clientid="bus-client", kind=kind), events))
    # The peer accepted a JWT (and no other kind of token) for this publish.
    assert jwt_peer.put_tokens[before:] and all(t == ("jwt", None) for t in jwt_peer.put_tokens[before:])
    assert [(r.resource, r.client_id, r.status) for r in identity.requests] == [
        (SERVICE_BUS_AUDIENCE + "/", "bus-client", 200)]
    received = receive_all_sync(jwt_peer.connection_string(), topic)
    assert sorted(r.message_id for r in received) == sorted(e.id for e in events)


def test_a_jwt_the_bus_does_not_trust_is_refused_for_good(jwt_peer: AmqpPeer, identity: IdentityEndpoint) -> None:
    other = IdentityEndpoint()  # the peer trusts another identity's signing key
    jwt_peer.jwt_verify = lambda token: other.verify(token, SERVICE_BUS_AUDIENCE)
    topic = unique("entra")
    jwt_peer.create_topic(topic)
    before = len(jwt_peer.put_tokens)
    with pytest.raises(DataPlaneError) as caught:
        asyncio.run(publish_and_close(token_publisher(jwt_peer, topic), make_events(1, ["file_discovered"])))
    other.close()
    assert jwt_peer.put_tokens[before][0] == "jwt" and "Signature" in (jwt_peer.put_tokens[before][1] or "")
    assert caught.value.status_code == 502 and topic in caught.value.message
    assert jwt_peer.topics[topic].transfers == []  # nothing was sent


def test_a_credential_without_a_token_is_503_naming_it(jwt_peer: AmqpPeer, identity: IdentityEndpoint) -> None:
    identity.refuse = True  # "Identity not found", as Microsoft Entra ID answers for an unknown identity
    topic = unique("entra")
    jwt_peer.create_topic(topic)
    with pytest.raises(DataPlaneUnavailable) as caught:
        asyncio.run(publish_and_close(token_publisher(jwt_peer, topic, deadline=20),
                                      make_events(1, ["file_discovered"])))
    message = caught.value.message
    assert caught.value.status_code == 503 and message.startswith(
        "event bus unavailable: ManagedIdentityCredential could not get a token"), message
    assert identity.requests and identity.requests[0].status == 400
    assert identity.secret not in message


@pytest.mark.parametrize("flags, error", [
    (["--servicebuseventprovider.credential=managedidentity"], "needs --servicebuseventprovider.namespace"),
    (["--servicebuseventprovider.credential=default", "--servicebuseventprovider.namespace=ns",
      "--servicebuseventprovider.key=k"], "drop --servicebuseventprovider.key"),
    (["--servicebuseventprovider.credential=workloadidentity", "--servicebuseventprovider.namespace=ns"],
     "needs AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID in the environment"),
    (["--servicebuseventprovider.credential=password", "--servicebuseventprovider.namespace=ns"],
     "--servicebuseventprovider.credential=password"),
    (["--servicebuseventprovider.namespace=ns", "--servicebuseventprovider.key=k",
      "--servicebuseventprovider.authorizationrulename=r", "--servicebuseventprovider.clientid=c"],
     "--servicebuseventprovider.clientid needs a token credential"),
])
def test_credential_settings_are_checked_at_start_up(flags: list[str], error: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s",
            "--servicebuseventprovider=true", "--servicebuseventprovider.topic=t", *flags]
    with pytest.raises(UsageError) as caught:
        compose_config(argv)
    assert error in str(caught.value) and "\n" not in str(caught.value)


def test_workload_identity_settings_pass_with_its_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("federated")
    monkeypatch.setenv("AZURE_TENANT_ID", "tenant")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    cfg, _ = compose_config(["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s",
                             "--servicebuseventprovider=true", "--servicebuseventprovider.namespace=ns",
                             "--servicebuseventprovider.credential=workloadidentity",
                             "--servicebuseventprovider.clientid=app-client"])
    assert cfg.servicebuseventprovider.credential is CredentialKind.workloadidentity
