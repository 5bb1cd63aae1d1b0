"""Hostile answers to the ranges of a download (each range after the first request is received into a
reused buffer, ``store._range_into``): a proxy in front of Azurite rewrites Azurite's real answer to
a range (``x-ms-range`` starting past 0) and the download must fail as it did through
``download_blob``, leave no file, give its byte budget back (a later download of the same blob
through the same store, with the smallest budget, finishes) and never let a wrong byte through.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from sidecar.dataplane.blobs import BlobVerificationError, partial_path
from sidecar.errors import DataPlaneError, DataPlaneUnavailable, is_transient
from sidecar.providers.azureblob.store import azure_blob_store
from testsupport.azurite import TEST_CHUNK_BYTES, Azurite, azure_config, connection_string_to, proxy_in_front

pytestmark = pytest.mark.anyio

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class Mangler(BaseHTTPRequestHandler):
    """Forwards every request to Azurite; the answer to the ranges past 0 goes through ``mode``."""

    protocol_version = "HTTP/1.1"
    upstream = 0
    mode = "pass"
    mangled = 0
    before_range: Callable[[], None] | None = None
    only_at: int | None = None  # the one range offset ``mode`` applies to (None: every range past 0)
    delay = 0.0  # seconds before a mangled answer
    content = b""  # the blob's bytes (the signed request cannot be changed: the proxy rewrites answers)

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"host"}}
        rng = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("x-ms-range", ""))
        first = type(self).mode == "invalidrange"  # the one mode for a first range (at 0)
        mode = type(self).mode if self.command == "GET" and rng and (int(rng[1]) > 0 or first) else "pass"
        if mode != "pass" and type(self).only_at not in (None, int(rng[1])):
            mode = "pass"
        if mode != "pass":
            time.sleep(type(self).delay)
            type(self).mangled += 1
            if type(self).before_range:
                type(self).before_range()
        start, end = (int(rng[1]), int(rng[2])) if rng else (0, 0)
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        if mode == "short":
            data = data[:-1000]
        elif mode == "long":
            data = data + b"x" * 1000
        elif mode == "full200":  # the whole blob, as a server that ignores ranges answers
            data = type(self).content
        elif mode == "shifted":  # the blob's bytes one before the range asked for
            data = type(self).content[start - 1:end]
        status = 200 if mode == "full200" else answer.status
        if mode == "invalidrange" and not data:  # as Azure answers a range of an empty blob (Azurite: 206)
            status, data = 416, b'<?xml version="1.0"?><Error><Code>InvalidRange</Code><Message>The range specified is invalid for the current size of the resource.</Message></Error>'
            answer.getheaders = lambda: [("x-ms-error-code", "InvalidRange"), ("Content-Type", "application/xml")]
        self.send_response(status)
        for k, v in answer.getheaders():
            if k.lower() not in HOP and not (mode in ("norange", "full200") and k.lower() == "content-range"):
                self.send_header(k, v)
        length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        if mode == "cut":  # the head promised all of it: half, then the connection is gone
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
        elif self.command != "HEAD":
            self.wfile.write(data)
        self.close_connection = True

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mangler(azurite: Azurite) -> Iterator[type[Mangler]]:
    with proxy_in_front(azurite, Mangler) as handler:
        yield handler


def _through_mangler(azurite: Azurite, mangler: type[Mangler], folder: Path, size: int,
                     inflightbytes: int) -> tuple[Any, Path, Path]:
    """A store whose requests go through ``mangler`` with an ``inflightbytes`` budget, a source file of
    ``size`` random bytes in ``folder`` and the download target beside it: (store, source, target)."""
    store = azure_blob_store(azure_config(azurite, connectionstring=connection_string_to(mangler.url), inflightbytes=inflightbytes))
    source = folder / "source"
    source.write_bytes(os.urandom(size))
    return store, source, folder / "in" / "blob"


@pytest.mark.parametrize("mode, error, words", [
    ("short", BlobVerificationError, "Content-Range spans"),  # refused by its head, before its body is read
    ("long", BlobVerificationError, "Content-Range spans"),
    ("full200", BlobVerificationError, "more than"),
    ("shifted", BlobVerificationError, "MD5"),
    ("cut", DataPlaneUnavailable, ""),
])
async def test_a_wrong_answer_to_a_range_fails_transient_and_leaves_nothing(
        azurite: Azurite, mangler: type[Mangler], tmp_path: Path, mode: str, error: type, words: str) -> None:
    chunk = TEST_CHUNK_BYTES
    store, source, target = _through_mangler(azurite, mangler, tmp_path, 5 * chunk + 3, chunk)
    try:
        info = await store.upload(source, "e/m/blob")
        mangler.content = source.read_bytes()
        for _ in range(3):  # more failures than the budget holds ranges
            mangler.mode = mode
            with pytest.raises(DataPlaneUnavailable) as caught:
                await asyncio.wait_for(store.download(info.key, target, info), 30)
            assert isinstance(caught.value, error), repr(caught.value)
            assert is_transient(caught.value) and words in str(caught.value), repr(caught.value)
            assert not target.exists() and not partial_path(target).exists()
        assert mangler.mangled >= 3, "the fault did not happen"
        mangler.mode = "pass"
        await asyncio.wait_for(store.download(info.key, target, info), 30)  # no budget was leaked
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


async def test_a_range_without_content_range_still_gets_the_right_bytes(
        azurite: Azurite, mangler: type[Mangler], tmp_path: Path) -> None:
    chunk = TEST_CHUNK_BYTES
    store, source, target = _through_mangler(azurite, mangler, tmp_path, 3 * chunk, chunk)
    try:
        info = await store.upload(source, "e/m/blob")
        mangler.mode = "norange"
        await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert mangler.mangled >= 2
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


async def test_an_empty_blob_whose_range_is_refused_as_azure_does_downloads_empty(
        azurite: Azurite, mangler: type[Mangler], tmp_path: Path) -> None:
    """Azure refuses a range of an empty blob (HTTP 416 InvalidRange); the blob is then asked for whole,
    as download_blob does, and its recorded MD5 still checked."""
    store, source, target = _through_mangler(azurite, mangler, tmp_path, 0, TEST_CHUNK_BYTES)
    try:
        info = await store.upload(source, "e/m/empty")
        mangler.mode = "invalidrange"
        assert await asyncio.wait_for(store.download(info.key, target, info), 30) == info
        assert mangler.mangled == 1 and target.read_bytes() == b""
    finally:
        await store.close()


async def test_a_blob_deleted_between_its_ranges_is_retried_then_missing_and_leaves_nothing(
        azurite: Azurite, mangler: type[Mangler], tmp_path: Path) -> None:
    from azure.storage.blob import BlobClient as SyncBlobClient

    chunk = TEST_CHUNK_BYTES
    store, source, target = _through_mangler(azurite, mangler, tmp_path, 4 * chunk, chunk)
    try:
        info = await store.upload(source, "e/m/blob")
        direct = SyncBlobClient.from_connection_string(azurite.connection_string(), store.container, "e/m/blob")
        mangler.before_range = lambda: direct.delete_blob() if direct.exists() else None
        mangler.mode = "deleted"
        # If-Match on a blob deleted meanwhile: Azurite answers 412 (a retry reads the blob again) ...
        with pytest.raises(DataPlaneUnavailable) as caught:
            await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert is_transient(caught.value) and "changed while it was downloaded" in str(caught.value)
        assert mangler.mangled >= 1 and not direct.exists()
        assert not target.exists() and not partial_path(target).exists()
        # ... and the retry finds it missing: permanent.
        with pytest.raises(DataPlaneError) as caught:
            await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert not is_transient(caught.value) and "does not exist" in str(caught.value), repr(caught.value)
        mangler.mode, mangler.before_range = "pass", None
        await store.upload(source, "e/m/blob")
        await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


async def test_a_failed_download_never_writes_into_a_file_opened_after_it(
        azurite: Azurite, mangler: type[Mangler], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Range 1 is being written by a worker thread (here one that starts late, as a busy machine's
    thread pool and the GIL's 5 ms switch interval make one) when range 2's connection is cut: the
    download fails and closes its partial file. Files the process opens right after (another
    download's partial file, a meta.json) must never receive the failed download's bytes."""
    from sidecar.providers.azureblob import store as store_module

    chunk = TEST_CHUNK_BYTES
    store = azure_blob_store(azure_config(azurite, connectionstring=connection_string_to(mangler.url),
                                          inflightbytes=4 * chunk))
    source = tmp_path / "source"
    source.write_bytes(os.urandom(4 * chunk))
    pwrite_md5 = store_module._pwrite_md5
    late: list[int] = []

    def late_start(fd: int, data: bytes, offset: int, digest: object) -> None:
        if offset == chunk and not late:
            late.append(fd)
            time.sleep(1.0)
        pwrite_md5(fd, data, offset, digest)

    monkeypatch.setattr(store_module, "_pwrite_md5", late_start)
    try:
        info = await store.upload(source, "e/m/blob")
        mangler.content = source.read_bytes()
        mangler.mode, mangler.only_at, mangler.delay = "cut", 2 * chunk, 0.3
        with pytest.raises(DataPlaneUnavailable):
            await store.download(info.key, tmp_path / "in" / "blob", info)
        assert late and mangler.mangled == 1, "the fault did not happen"
        # Files opened right after the failure (the lowest free numbers, the partial file's among them).
        victims = [os.open(tmp_path / f"victim{i}", os.O_RDWR | os.O_CREAT) for i in range(16)]
        try:
            assert late[0] in victims, (late, victims)
            for fd in victims:
                os.pwrite(fd, bytes(2 * chunk), 0)
            await asyncio.sleep(1.5)  # the late thread has run by now
            spoiled = [i for i, fd in enumerate(victims) if os.pread(fd, 3 * chunk, 0) != bytes(2 * chunk)]
        finally:
            for fd in victims:
                os.close(fd)
        assert not spoiled, f"victim files {spoiled} received the failed download's range"
    finally:
        await store.close()
