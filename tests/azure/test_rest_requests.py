"""Get Blob and Put Blob sent through the SDK's pipeline (``sidecar.providers.azureblob.rest``) keep the
blobs the SDK's clients see: the same names (URL quoting), sizes and recorded MD5s, whichever side
wrote them, on every path of the store (empty blob, one request, streamed put, blocks, ranges).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient

from sidecar.dataplane.blobs import BlobInfo, BlobVerificationError
from sidecar.providers.azureblob.store import azure_blob_store
from testsupport.azurite import TEST_CHUNK_BYTES, Azurite, azure_config

pytestmark = pytest.mark.anyio

CHUNK = TEST_CHUNK_BYTES
# Blanks, %, #, ?, +, &, =, ;, quotes and letters beyond ASCII: each is quoted in the URL, and a
# request signed for another spelling of the name than the one sent is refused (403).
ODD_NAME = "e/m/a b+c%20d#e?f&g=h;'ü€'/ø 😀.txt"


@pytest.mark.parametrize("size, single_put", [
    (0, 0), (1, 0), (CHUNK - 1, 0), (CHUNK, 0), (CHUNK + 1, 0), (3 * CHUNK + 5, 0), (3 * CHUNK + 5, 4 * CHUNK),
], ids=["empty", "one-byte", "under-a-chunk", "one-chunk", "a-chunk-and-one", "blocks", "streamed-put"])
async def test_a_blob_written_here_reads_the_same_through_the_sdk_and_back(
        azurite: Azurite, tmp_path: Path, size: int, single_put: int) -> None:
    cfg = azure_config(azurite, maxsingleputbytes=single_put)
    store = azure_blob_store(cfg)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(size))
    md5 = hashlib.md5(source.read_bytes()).digest()
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        for key in ("e/m/plain.bin", ODD_NAME):
            info = await store.upload(source, key)
            assert info == BlobInfo(key, size, md5.hex())
            blob = service.get_blob_client(cfg.containername, key)
            props = await blob.get_blob_properties()
            assert props.size == size and bytes(props.content_settings.content_md5) == md5
            assert await (await blob.download_blob()).readall() == source.read_bytes()
            target = tmp_path / "in" / key.replace("/", "_")
            assert await store.download(key, target, info) == info
            assert target.read_bytes() == source.read_bytes()
    finally:
        await service.close()
        await store.close()


@pytest.mark.parametrize("size", [0, 5, 3 * CHUNK + 5], ids=["empty", "small", "ranges"])
async def test_a_blob_the_sdk_wrote_downloads_here_with_its_md5_checked(azurite: Azurite, tmp_path: Path,
                                                                        size: int) -> None:
    cfg = azure_config(azurite)
    store = azure_blob_store(cfg)
    data = os.urandom(size)
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        await service.create_container(cfg.containername)
        blob = service.get_blob_client(cfg.containername, ODD_NAME)
        await blob.upload_blob(data, validate_content=True)
        target = tmp_path / "in" / "blob"
        got = await store.download(ODD_NAME, target, BlobInfo(ODD_NAME, size, hashlib.md5(data).hexdigest()))
        assert got.size == size and target.read_bytes() == data
        # With no MD5 expected, the bytes are still checked against the one the service records
        # (x-ms-blob-content-md5 with a range, Content-MD5 for the empty blob asked for whole).
        other = ContentSettings(content_md5=bytearray(hashlib.md5(b"other").digest()))
        await blob.set_http_headers(content_settings=other)
        target.unlink()
        with pytest.raises(BlobVerificationError) as caught:
            await store.download(ODD_NAME, target, None)
        assert f"expected {hashlib.md5(b'other').hexdigest()}" in str(caught.value) and not target.exists()
    finally:
        await service.close()
        await store.close()


async def test_a_sas_connection_string_signs_every_request_and_no_recorded_url(azurite: Azurite,
                                                                               tmp_path: Path) -> None:
    """A connection string with a SharedAccessSignature (no account key): the SAS goes on every request
    after the blob's path, and never into a URL recorded for people (``blob_url``)."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    from testsupport.azurite import ACCOUNT, ACCOUNT_KEY

    sas = generate_account_sas(ACCOUNT, ACCOUNT_KEY, ResourceTypes(container=True, object=True),
                               AccountSasPermissions(read=True, write=True, create=True),
                               datetime.now(timezone.utc) + timedelta(hours=1))
    cfg = azure_config(azurite, connectionstring=f"BlobEndpoint={azurite.endpoint};SharedAccessSignature={sas}")
    store = azure_blob_store(cfg)
    source = tmp_path / "source"
    try:
        for size in (5, 3 * CHUNK + 5):
            source.write_bytes(os.urandom(size))
            info = await store.upload(source, ODD_NAME)
            target = tmp_path / "in" / f"{size}"
            assert await store.download(ODD_NAME, target, info) == info and target.read_bytes() == source.read_bytes()
        assert "sig=" not in store.blob_url(ODD_NAME) and "?" not in store.blob_url("e/m/f.txt")
    finally:
        await store.close()
