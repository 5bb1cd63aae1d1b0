"""The Azure Blob provider with a Microsoft Entra ID token credential (issue 12), for real.

Azurite runs in its OAuth mode over HTTPS (``--oauth basic`` with a self-signed certificate this test
makes, trusted through ``SSL_CERT_FILE``). azure-identity's ``ManagedIdentityCredential`` gets its
token from a managed identity endpoint on loopback (App Service style ``IDENTITY_ENDPOINT`` and
``IDENTITY_HEADER``, ``testsupport/identity.py``); Azurite checks the token's issuer, audience and lifetime.
Child SAS URLs are user-delegation SAS: Azurite issues the delegation key (Get User Delegation Key)
and checks the SAS signature when the child downloads through the URL.
"""

from __future__ import annotations

import asyncio

import os
import ssl
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from sidecar.cli import UsageError, compose_config
from sidecar.dataplane.credentials import CredentialKind
from sidecar.providers.azureblob.config import AzureBlobConfig
from sidecar.providers.azureblob.store import UserDelegationSigner, azure_blob_store
from sidecar.errors import DataPlaneError, DataPlaneUnavailable
from testsupport.azurite import Azurite, run_azurite
from testsupport.identity import STORAGE_AUDIENCE, IdentityEndpoint, TlsFiles, self_signed_tls

pytestmark = pytest.mark.anyio

SAS_SECONDS = 3600


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def oauth_azurite(tls: TlsFiles) -> Iterator[Azurite]:
    with run_azurite(tls=tls) as service:
        yield service


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch, tls: TlsFiles) -> Iterator[IdentityEndpoint]:
    """A managed identity endpoint the credential finds through the environment; TLS trusts ``tls``."""
    endpoint = IdentityEndpoint()
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))
    yield endpoint
    endpoint.close()


def token_config(azurite: Azurite, **overrides: object) -> AzureBlobConfig:
    settings: dict = dict(enabled=True, containername=f"c{uuid.uuid4().hex[:20]}", accounturl=azurite.endpoint,
                          credential=CredentialKind.managedidentity, chunkbytes=64 * 1024,
                          sasexpiryseconds=SAS_SECONDS, connecttimeoutseconds=5.0, readtimeoutseconds=10.0)
    settings.update(overrides)
    return AzureBlobConfig(**settings)


def delegation_key_requests(azurite: Azurite) -> int:
    """Get User Delegation Key requests Azurite served, read from its debug log."""
    assert azurite.log is not None
    return azurite.log.read_text(errors="replace").count("Service_GetUserDelegationKey")


async def test_upload_download_and_a_user_delegation_sas_a_child_reads(
        oauth_azurite: Azurite, identity: IdentityEndpoint, tls: TlsFiles, tmp_path: Path) -> None:
    small, large = tmp_path / "small.txt", tmp_path / "large.bin"
    small.write_bytes(b"hello")
    large.write_bytes(os.urandom(200_000))  # above chunkbytes: Put Block + Put Block List
    store = azure_blob_store(token_config(oauth_azurite, clientid="blob-client"))
    fetched_before = delegation_key_requests(oauth_azurite)
    try:
        infos = [await store.upload(small, "e/m/small.txt"), await store.upload(large, "e/m/large.bin")]
        for info, source in zip(infos, (small, large)):
            copy = tmp_path / "in" / source.name
            await store.download(info.key, copy, info)
            assert copy.read_bytes() == source.read_bytes()
        urls = [store.url(info.key) for info in infos]
    finally:
        await store.close()
    # The token came from the managed identity endpoint, for storage, for the configured identity.
    assert {(r.resource, r.client_id, r.status) for r in identity.requests} == {(STORAGE_AUDIENCE, "blob-client", 200)}
    # One delegation key for both uploads and both URLs.
    assert delegation_key_requests(oauth_azurite) - fetched_before == 1
    trusted = ssl.create_default_context(cafile=str(tls.cert))
    for url, source in zip(urls, (small, large)):
        query = parse_qs(urlparse(url).query)
        # A user-delegation SAS names the identity that signed it (skoid/sktid), read-only.
        assert query["skoid"] == [identity.object_id] and query["sktid"] == [identity.tenant_id]
        assert query["sp"] == ["r"]
        child = httpx.get(url, verify=trusted)
        assert child.status_code == 200 and child.content == source.read_bytes()
    # Azurite checks the signature: the same SAS on another blob is refused, and so is no SAS at all.
    assert httpx.get(urls[0].replace("small.txt?", "large.bin?"), verify=trusted).status_code == 403
    assert httpx.get(urls[0].split("?")[0], verify=trusted).status_code in (401, 403, 404)


async def test_the_delegation_key_is_fetched_again_near_its_expiry(
        oauth_azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path) -> None:
    source = tmp_path / "f.txt"
    source.write_bytes(b"data")
    store = azure_blob_store(token_config(oauth_azurite))
    signer = store._signer
    assert isinstance(signer, UserDelegationSigner)
    fetched_before = delegation_key_requests(oauth_azurite)
    try:
        await store.upload(source, "e/m/a.txt")
        first = signer.key
        # The key now expires sooner than the SAS lifetime: the next upload must fetch a new one.
        ages = datetime.now(timezone.utc) + timedelta(seconds=SAS_SECONDS)
        first.signed_expiry = ages.strftime("%Y-%m-%dT%H:%M:%SZ")
        with pytest.raises(DataPlaneUnavailable):
            store.url("e/m/a.txt")  # never signs past its key's expiry
        await store.upload(source, "e/m/b.txt")
        assert signer.key is not first
        assert store.url("e/m/b.txt")
    finally:
        await store.close()
    assert delegation_key_requests(oauth_azurite) - fetched_before == 2


async def test_a_credential_without_a_token_is_503_naming_it(
        oauth_azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path) -> None:
    identity.refuse = True  # "Identity not found", as Microsoft Entra ID answers for an unknown identity
    source = tmp_path / "f.txt"
    source.write_bytes(b"data")
    store = azure_blob_store(token_config(oauth_azurite, sasexpiryseconds=0))
    try:
        with pytest.raises(DataPlaneUnavailable) as caught:
            await store.upload(source, "e/m/f.txt")
    finally:
        await store.close()
    message = caught.value.message
    assert caught.value.status_code == 503 and message.startswith(
        "blob store unavailable: ManagedIdentityCredential could not get a token"), message
    assert STORAGE_AUDIENCE in message and identity.secret not in message
    assert [r.status for r in identity.requests] == [400]


@pytest.mark.parametrize("sas_seconds, failing", [(0, "blob 'e/m/f.txt'"), (SAS_SECONDS, "Get User Delegation Key")])
async def test_a_token_the_service_refuses_is_permanent(
        oauth_azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path, sas_seconds: int, failing: str) -> None:
    identity.issuer = "https://issuer.invalid/"  # Azurite accepts only Microsoft Entra ID issuers
    source = tmp_path / "f.txt"
    source.write_bytes(b"data")
    store = azure_blob_store(token_config(oauth_azurite, sasexpiryseconds=sas_seconds))
    try:
        with pytest.raises(DataPlaneError) as caught:
            await store.upload(source, "e/m/f.txt")
    finally:
        await store.close()
    assert caught.value.status_code == 502, caught.value.message
    assert failing in caught.value.message and "authentication failed" in caught.value.message
    assert identity.issued and not any(token in caught.value.message for token in identity.issued)


BASE = ["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--azureblobprovider=true",
        "--azureblobprovider.containername=blobs"]


@pytest.mark.parametrize("flags, error", [
    (["--azureblobprovider.credential=managedidentity"],
     "needs --azureblobprovider.blobaccountname or --azureblobprovider.accounturl"),
    (["--azureblobprovider.credential=default", "--azureblobprovider.blobaccountname=acct",
      "--azureblobprovider.blobaccountkey=k"], "drop --azureblobprovider.blobaccountkey"),
    (["--azureblobprovider.credential=managedidentity", "--azureblobprovider.accounturl=http://127.0.0.1:1/a"],
     "is not an https:// URL"),
    (["--azureblobprovider.credential=managedidentity", "--azureblobprovider.blobaccountname=acct",
      "--azureblobprovider.sasexpiryseconds=700000"], "exceeds 7 days"),
    (["--azureblobprovider.credential=workloadidentity", "--azureblobprovider.blobaccountname=acct"],
     "needs AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID in the environment"),
    (["--azureblobprovider.credential=token", "--azureblobprovider.blobaccountname=acct"],
     "--azureblobprovider.credential=token"),
    (["--azureblobprovider.connectionstring=UseDevelopmentStorage=true", "--azureblobprovider.clientid=x"],
     "--azureblobprovider.clientid needs a token credential"),
])
def test_credential_settings_are_checked_at_start_up(flags: list[str], error: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError) as caught:
        compose_config(BASE + flags)
    assert error in str(caught.value) and "\n" not in str(caught.value)


def test_managed_identity_settings_compose() -> None:
    cfg, _ = compose_config(BASE + ["--azureblobprovider.credential=managedidentity",
                                    "--azureblobprovider.blobaccountname=acct", "--azureblobprovider.clientid=id"])
    blob = cfg.azureblobprovider
    assert (blob.credential, blob.clientid, blob.blobaccountname) == (CredentialKind.managedidentity, "id", "acct")


def test_done_through_a_sidecar_records_user_delegation_sas_urls(
        oauth_azurite: Azurite, identity: IdentityEndpoint, tls: TlsFiles, tmp_path: Path) -> None:
    """A real sidecar process signing in with the managed identity: /done uploads, and the child event
    meta's URL is a user-delegation SAS a child downloads through; no token or identity secret is logged."""
    from sidecar.providers.jsonfiles import JsonFileDocumentStore
    from testsupport.processes import SidecarProcess, dev_args
    from testsupport.processes import run_module

    args = [a for a in dev_args("evt-entra", "corr-entra", "parent") if a != "--development=true"] + [
        "--azureblobprovider=true", "--azureblobprovider.containername=entra-e2e",
        "--azureblobprovider.credential=managedidentity", f"--azureblobprovider.accounturl={oauth_azurite.endpoint}"]
    env = {**identity.env(), "SSL_CERT_FILE": str(tls.cert)}
    with SidecarProcess(tmp_path, args, env=env) as sidecar:
        done = run_module(sidecar, EVENT_LABEL="root", FILES="1")[-1]["done"]
        output = sidecar.output()
    assert done["files"] == 1 and len(done["events"]) == 1, output
    meta = asyncio.run(JsonFileDocumentStore(tmp_path / ".dev" / "documents").get_event_meta(done["events"][0]["eventId"]))
    [recorded] = meta.files
    query = parse_qs(urlparse(recorded.url).query)
    assert query["skoid"] == [identity.object_id], recorded.url
    source = tmp_path / "ion" / "out" / "data" / recorded.path
    child = httpx.get(recorded.url, verify=ssl.create_default_context(cafile=str(tls.cert)))
    assert child.status_code == 200 and child.content == source.read_bytes()
    assert identity.secret not in output and not any(token in output for token in identity.issued)
