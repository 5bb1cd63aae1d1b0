"""Hostile answers to the first Get Blob of a download (offset 0) and to Put Blob, from a proxy in
front of Azurite that forwards each signed request unchanged and writes its own raw answer: the
REST requests (``sidecar.providers.azureblob.rest``) must fail with the sidecar's errors, leave no
file, give back their byte budget, read no more of a lying answer than they asked for, and never
carry a SAS signature into an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import socket
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Iterator

import pytest

from sidecar.dataplane.blobs import BlobInfo, BlobVerificationError, partial_path
from sidecar.errors import DataPlaneError, DataPlaneUnavailable, is_transient
from sidecar.providers.azureblob.store import azure_blob_store
from testsupport.azurite import TEST_CHUNK_BYTES, Azurite, azure_config, connection_string_to, proxy_in_front

pytestmark = pytest.mark.anyio

CHUNK = TEST_CHUNK_BYTES
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

# (the proxy handler, method, x-ms-range start or None, Azurite's status, its headers, its body) ->
# True when the rewrite wrote its own answer on the socket; False to pass Azurite's on.
Rewrite = Callable[["Proxy", str, "int | None", int, dict[str, str], bytes], bool]


class Proxy(BaseHTTPRequestHandler):
    """Forwards every request to Azurite; ``rewrite`` may answer in its place (raw bytes)."""

    protocol_version = "HTTP/1.1"
    upstream = 0
    rewrite: Rewrite | None = None
    rewritten = 0
    sent = 0  # bytes of rewritten bodies the client took

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"host"}}
        rng = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("x-ms-range", ""))
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        kept = {k: v for k, v in answer.getheaders() if k.lower() not in HOP}
        self.close_connection = True
        rewrite = type(self).rewrite
        if rewrite and rewrite(self, self.command, int(rng[1]) if rng else None, answer.status, kept, data):
            return
        # A HEAD answer (Get Blob Properties) tells the blob's size in its Content-Length.
        self.head(answer.status, kept, int(answer.getheader("Content-Length", "0")) if self.command == "HEAD"
                  else len(data), rewritten=False)
        self.wfile.write(data)

    def head(self, status: int, headers: dict[str, str], length: int | None, rewritten: bool = True) -> None:
        """Write a status line and ``headers`` (with ``Content-Length: length`` unless None); a rewrite's
        answer is counted in ``rewritten`` before the client can see it."""
        type(self).rewritten += rewritten
        self.send_response_only(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()

    def stream(self, piece: bytes, total: int, chunked: bool = False) -> None:
        """Write ``total`` bytes of repeated ``piece`` (chunked transfer coding if asked) until the
        client stops taking them; counts what it took in ``sent``."""
        try:
            while type(self).sent < total:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                type(self).sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[type[Proxy]]:
    with proxy_in_front(azurite, Proxy) as handler:
        yield handler


async def _blob_without_md5(azurite: Azurite, store, tmp_path: Path, key: str) -> Callable[[bytes], None]:
    """A writer of blob ``key`` in ``store``'s container (created by a first upload through the store) as
    one committed block: a block blob with no MD5 recorded, as Put Block List without one leaves it."""
    from azure.storage.blob import BlobBlock, BlobClient as SyncBlobClient

    (tmp_path / "seed").write_bytes(b"x")
    await store.upload(tmp_path / "seed", "e/m/seed")
    direct = SyncBlobClient.from_connection_string(azurite.connection_string(), store.container, key)

    def write(data: bytes) -> None:
        direct.stage_block("b0", data)
        direct.commit_block_list([BlobBlock("b0")])

    return write


def _first_get(change: Callable[[Proxy, int, dict[str, str], bytes], bool]) -> Rewrite:
    """A rewrite of the answers to the first request of a download (range at 0) only."""
    def rewrite(handler: Proxy, method: str, start: int | None, status: int, headers: dict[str, str],
                data: bytes) -> bool:
        return method == "GET" and start == 0 and change(handler, status, headers, data)
    return rewrite


def _header(headers: dict[str, str], name: str, value: str | None) -> dict[str, str]:
    """``headers`` with ``name`` replaced by ``value`` (removed when None)."""
    kept = {k: v for k, v in headers.items() if k.lower() != name.lower()}
    return kept if value is None else {**kept, name: value}


def _put_blob(change: Callable[[Proxy, int, dict[str, str], bytes], bool]) -> Rewrite:
    """A rewrite of the answers to Put Blob only (not Put Block, Put Block List or Create Container)."""
    def rewrite(handler: Proxy, method: str, start: int | None, status: int, headers: dict[str, str],
                data: bytes) -> bool:
        return method == "PUT" and "comp=" not in handler.path and "restype=" not in handler.path and change(
            handler, status, headers, data)
    return rewrite


def _store(azurite: Azurite, proxy: type[Proxy], **overrides: object):
    return azure_blob_store(azure_config(azurite, connectionstring=connection_string_to(proxy.url), **overrides))


async def _fails_and_leaves_nothing(store, key: str, target: Path, expected: BlobInfo | None) -> BaseException:
    """Download ``key`` expecting a sidecar error; asserts no file or partial file is left; returns it."""
    with pytest.raises((DataPlaneError, DataPlaneUnavailable)) as caught:
        await asyncio.wait_for(store.download(key, target, expected), 30)
    assert not target.exists() and not partial_path(target).exists()
    return caught.value


BIG = 64 * 1024 * 1024  # the body a lying answer offers, bytes


async def _refused_once_then_read(store, proxy: type[Proxy], target: Path, expected: BlobInfo | None, words: str,
                                  content: bytes) -> None:
    """Blob ``e/m/blob``'s download through the rewriting ``proxy`` fails verification naming ``words``,
    from one rewritten answer, and leaves nothing; with the proxy passing answers again, the same store
    (its budget given back) reads ``content``."""
    error = await _fails_and_leaves_nothing(store, "e/m/blob", target, expected)
    assert isinstance(error, BlobVerificationError) and words in str(error), repr(error)
    assert proxy.rewritten == 1
    proxy.rewrite = None
    await asyncio.wait_for(store.download("e/m/blob", target, None), 30)
    assert target.read_bytes() == content


@pytest.mark.parametrize("request_, answer", [
    ("get", "500 with a 64 MiB body"),
    ("get", "500 with an endless chunked body"),
    ("put", "500 with a 64 MiB body"),
    ("put", "201 with a 64 MiB body"),
])
async def test_an_answer_that_is_not_blob_data_is_never_read_past_a_small_bound(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, request_: str, answer: str) -> None:
    """An error's body (Azure's is a few hundred bytes of XML) and Put Blob's (empty) are read into
    memory whole by the generated layer; a proxy or server offering 64 MiB there must not make the
    client take it: the client reads a small bound, drops the connection and goes on."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(3 * CHUNK + 5))
    target = tmp_path / "in" / "blob"
    status = int(answer[:3])

    def lie(handler: Proxy, _status: int, headers: dict[str, str], _data: bytes) -> bool:
        chunked = "chunked" in answer
        handler.head(status, {**(headers if status == 201 else {}), "Content-Type": "application/xml"},
                     None if chunked else BIG)
        handler.stream(b"<" * 65536, BIG, chunked=chunked)
        return True

    try:
        if request_ == "get":
            info = await store.upload(source, "e/m/blob")
            proxy.rewrite = _first_get(lie)
            error = await _fails_and_leaves_nothing(store, info.key, target, info)
            assert is_transient(error) and "HTTP 500" in str(error), repr(error)
        else:
            proxy.rewrite = _put_blob(lie)
            source.write_bytes(os.urandom(CHUNK // 2))
            if status == 201:  # acknowledged with the right MD5: stored, whatever the body
                info = await asyncio.wait_for(store.upload(source, "e/m/blob"), 30)
                assert info.md5 == hashlib.md5(source.read_bytes()).hexdigest()
            else:
                with pytest.raises(DataPlaneUnavailable) as caught:
                    await asyncio.wait_for(store.upload(source, "e/m/blob"), 30)
                assert "HTTP 500" in str(caught.value), repr(caught.value)
        assert proxy.rewritten == 1, "the fault did not happen"
        assert proxy.sent < BIG // 2, f"the client read {proxy.sent} bytes of the lying body"
        proxy.rewrite = None
        info = await store.upload(source, "e/m/blob")
        await asyncio.wait_for(store.download(info.key, target, info), 30)  # no budget was kept
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


@pytest.mark.parametrize("request_, status", [("get", 204), ("get", 202), ("put", 200), ("put", 204)])
async def test_an_unexpected_success_status_fails_as_a_sidecar_error(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, request_: str, status: int) -> None:
    """Get Blob answers 200 or 206, Put Blob 201: any other 2xx is no answer the store can use, and
    must fail as the sidecar's error (``process_storage_error`` re-raises a 200/204 as it came, with
    no ``error_code``), never as a programming error."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(CHUNK // 2))
    target = tmp_path / "in" / "blob"

    def lie(handler: Proxy, _status: int, headers: dict[str, str], _data: bytes) -> bool:
        handler.head(status, headers, 0)
        return True

    try:
        if request_ == "get":
            info = await store.upload(source, "e/m/blob")
            proxy.rewrite = _first_get(lie)
            error = await _fails_and_leaves_nothing(store, info.key, target, info)
        else:
            proxy.rewrite = _put_blob(lie)
            with pytest.raises((DataPlaneError, DataPlaneUnavailable)) as caught:
                await asyncio.wait_for(store.upload(source, "e/m/blob"), 30)
            error = caught.value
        assert f"HTTP {status}" in str(error) and proxy.rewritten == 1, repr(error)
        proxy.rewrite = None
        info = await store.upload(source, "e/m/blob")
        await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


# Not an MD5 in base64: no base64 at all (decodes to nothing, unless validated), not base64, too short.
MALFORMED_MD5 = ["****", "not base64!", "AAAA"]


@pytest.mark.parametrize("value", MALFORMED_MD5)
async def test_a_malformed_recorded_md5_fails_the_download_verification(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, value: str) -> None:
    """A first answer whose ``x-ms-blob-content-md5`` is no MD5 cannot be taken for "no MD5 recorded"
    (which would skip the check of a download with no expected MD5)."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(3 * CHUNK + 5))
    target = tmp_path / "in" / "blob"
    try:
        info = await store.upload(source, "e/m/blob")
        proxy.rewrite = _first_get(lambda handler, status, headers, data: (
            handler.head(status, _header(headers, "x-ms-blob-content-md5", value), len(data)),
            handler.wfile.write(data)) and True)
        for expected in (None, BlobInfo(info.key, info.size, None), info):
            error = await _fails_and_leaves_nothing(store, info.key, target, expected)
            assert isinstance(error, BlobVerificationError) and "MD5" in str(error), repr(error)
        assert proxy.rewritten == 3
        proxy.rewrite = None
        await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


@pytest.mark.parametrize("value", MALFORMED_MD5)
@pytest.mark.parametrize("single_put", [0, 4 * CHUNK], ids=["one-request", "streamed"])
async def test_a_malformed_stored_md5_fails_the_upload_verification(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, value: str, single_put: int) -> None:
    store = _store(azurite, proxy, maxsingleputbytes=single_put)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(CHUNK // 2 if not single_put else 3 * CHUNK))
    proxy.rewrite = _put_blob(lambda handler, status, headers, data: (
        handler.head(status, _header(headers, "Content-MD5", value), len(data)), handler.wfile.write(data)) and True)
    try:
        with pytest.raises(BlobVerificationError) as caught:
            await asyncio.wait_for(store.upload(source, "e/m/blob"), 30)
        assert "MD5" in str(caught.value) and proxy.rewritten == 1, repr(caught.value)
    finally:
        await store.close()


async def test_a_first_answer_without_etag_does_not_mix_two_versions(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path) -> None:
    """The ranges after the first are asked ``If-Match`` the first answer's ETag. A first answer without
    one (a proxy dropped it) cannot pin them: the blob, overwritten right after that answer (same size,
    no MD5 recorded, as Put Block List without one leaves it), must not come back as a mix of both."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    target = tmp_path / "in" / "blob"
    old, new = os.urandom(3 * CHUNK + 5), os.urandom(3 * CHUNK + 5)

    def overwritten_after(handler: Proxy, status: int, headers: dict[str, str], data: bytes) -> bool:
        write(new)
        handler.head(status, _header(headers, "ETag", None), len(data))
        handler.wfile.write(data)
        return True

    try:
        write = await _blob_without_md5(azurite, store, tmp_path, "e/m/blob")
        write(old)
        proxy.rewrite = _first_get(overwritten_after)
        await _refused_once_then_read(store, proxy, target, None, "ETag", new)
    finally:
        await store.close()


@pytest.mark.parametrize("expected_size", [0, CHUNK // 2, 3 * CHUNK])
async def test_a_blob_of_another_size_than_expected_is_refused_at_its_first_answer(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, expected_size: int) -> None:
    """The size the event meta records is known before the first request: a blob of another size
    (overwritten since) is refused by its first answer, not downloaded whole onto the module's volume
    and refused after."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(8 * CHUNK + 5))
    target = tmp_path / "in" / "blob"
    asked: list[int | None] = []

    def count(handler: Proxy, method: str, start: int | None, status: int, headers: dict[str, str],
              data: bytes) -> bool:
        if method == "GET":
            asked.append(start)
        return False

    try:
        info = await store.upload(source, "e/m/blob")
        proxy.rewrite = count
        error = await _fails_and_leaves_nothing(store, info.key, target, BlobInfo(info.key, expected_size, info.md5))
        assert isinstance(error, BlobVerificationError) and f"expected {expected_size} bytes" in str(error), repr(error)
        assert asked == [0], f"ranges asked of a blob of the wrong size: {asked}"
        await asyncio.wait_for(store.download(info.key, target, info), 30)
        assert target.read_bytes() == source.read_bytes()
    finally:
        await store.close()


@pytest.mark.parametrize("at", [0, 2 * CHUNK], ids=["first-answer", "a-later-range"])
async def test_an_answer_for_another_range_than_asked_is_refused(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path, at: int) -> None:
    """A cache that ignores the range answers another slice of the blob, its own Content-Range saying
    so, with the length asked: with no MD5 recorded or expected, nothing else tells the bytes are
    from the wrong place."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    target = tmp_path / "in" / "blob"
    content = os.urandom(4 * CHUNK)

    def other_slice(handler: Proxy, method: str, start: int | None, status: int, headers: dict[str, str],
                    data: bytes) -> bool:
        if method != "GET" or start != at:
            return False
        shifted = at + CHUNK // 2
        handler.head(206, _header(headers, "Content-Range", f"bytes {shifted}-{shifted + len(data) - 1}/{len(content)}"),
                     len(data))
        handler.wfile.write(content[shifted:shifted + len(data)])
        return True

    try:
        (await _blob_without_md5(azurite, store, tmp_path, "e/m/blob"))(content)
        proxy.rewrite = other_slice
        await _refused_once_then_read(store, proxy, target, BlobInfo("e/m/blob", len(content), None), f"at {at}", content)
    finally:
        await store.close()


async def test_an_answer_whose_length_disagrees_with_its_content_range_is_refused(
        azurite: Azurite, proxy: type[Proxy], tmp_path: Path) -> None:
    """A proxy that compresses an answer (the client sends ``Accept-Encoding: gzip``, and a blob's own
    ``Content-Encoding`` makes that header useless to tell) sends fewer bytes than its Content-Range
    spans; taken raw, they were written as the blob's first bytes and the next range asked after them,
    so the file had the right size and, with no MD5 known, passed."""
    import gzip


    store = _store(azurite, proxy, inflightbytes=CHUNK)
    target = tmp_path / "in" / "blob"
    content = bytes(4 * CHUNK)  # compresses well

    def compressed(handler: Proxy, status: int, headers: dict[str, str], data: bytes) -> bool:
        packed = gzip.compress(data)
        handler.head(status, {**headers, "Content-Encoding": "gzip"}, len(packed))
        handler.wfile.write(packed)
        return True

    try:
        (await _blob_without_md5(azurite, store, tmp_path, "e/m/blob"))(content)
        proxy.rewrite = _first_get(compressed)
        await _refused_once_then_read(store, proxy, target, BlobInfo("e/m/blob", len(content), None), "Content-Range", content)
    finally:
        await store.close()


# Names name_problem accepts, side by side in one container: pairs that differ only by how a URL
# would quote them or by Unicode normalisation must stay different blobs.
NAMES = ["a/b", "a%2Fb", "a b", "a%20b", "a+b", "a%2Bb", "%", "%25", "%zz", "p%2e%2e/q", " lead", "trail ", "q?x=1&y",
         "h#frag", "a;b=c", "'\"`", "$&@:,!()*", "[]{}^|", "~t", ".hidden", "..x", "x..y",
         "caf\u00e9", "cafe\u0301", "\u00c5", "\u212b", "\u200b", "nb\u00a0sp", "\ufeffbom", "\ufffd", "😀/中文/שלום",
         "/".join("d" * 254), "n" * 255, ("y" * 200 + "/") * 4 + "y" * 219, "/".join(["😀" * 63] * 8)]


async def test_every_accepted_name_is_one_blob_to_the_rest_requests_and_the_sdk(azurite: Azurite,
                                                                                tmp_path: Path) -> None:
    """Each name written here is the blob the SDK's own clients read, list and address (same URL),
    and each reads back here with its own bytes: no two names meet in one blob."""
    from azure.storage.blob.aio import BlobServiceClient

    from sidecar.paths import name_problem

    assert [n for n in NAMES if name_problem(n)] == [] and len(set(NAMES)) == len(NAMES)
    cfg = azure_config(azurite)
    store = azure_blob_store(cfg)
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        for i, name in enumerate(NAMES):
            (tmp_path / f"{i}").write_bytes(f"{i}:{name}".encode())
            await store.upload(tmp_path / f"{i}", name)
        container = service.get_container_client(cfg.containername)
        assert sorted([b.name async for b in container.list_blobs()]) == sorted(NAMES)
        for i, name in enumerate(NAMES):
            blob = container.get_blob_client(name)
            assert store.blob_url(name) == blob.url, name
            assert await (await blob.download_blob()).readall() == f"{i}:{name}".encode(), name
            target = tmp_path / "in" / f"{i}"
            await store.download(name, target, None)
            assert target.read_bytes() == f"{i}:{name}".encode(), name
    finally:
        await service.close()
        await store.close()


async def test_a_range_answered_from_another_version_is_refused(azurite: Azurite, proxy: type[Proxy],
                                                                tmp_path: Path) -> None:
    """A cache that keys on the URL and range only answers a later range from the version it saw
    before, ignoring ``If-Match``: its answer names that version's ETag, and must not be joined to
    the current version's first range (same size, no MD5 recorded or expected)."""
    store = _store(azurite, proxy, inflightbytes=CHUNK)
    target = tmp_path / "in" / "blob"
    old, new = os.urandom(4 * CHUNK), os.urandom(4 * CHUNK)
    cached: dict[int, tuple[int, dict[str, str], bytes]] = {}
    replaying = False

    def stale_cache(handler: Proxy, method: str, start: int | None, status: int, headers: dict[str, str],
                    data: bytes) -> bool:
        if method != "GET" or start is None:
            return False
        if not replaying:
            cached[start] = (status, headers, data)
            return False
        if start != 2 * CHUNK:
            return False
        status, headers, data = cached[start]
        handler.head(status, headers, len(data))
        handler.wfile.write(data)
        return True

    try:
        write = await _blob_without_md5(azurite, store, tmp_path, "e/m/blob")
        write(old)
        proxy.rewrite = stale_cache
        await asyncio.wait_for(store.download("e/m/blob", target, None), 30)
        assert target.read_bytes() == old and 2 * CHUNK in cached
        target.unlink()
        write(new)
        replaying = True
        await _refused_once_then_read(store, proxy, target, BlobInfo("e/m/blob", len(new), None), "ETag", new)
    finally:
        await store.close()
