"""The Azure Blob provider: a :class:`~sidecar.dataplane.blobs.BlobStore` on one container, with the
service client built through adlfs (``abfs://``).

``--azureblobprovider=true`` (``conf/azureblobprovider/azure.yaml``) selects it. The file system is an
adlfs ``AzureBlobFileSystem`` rooted at the container; only the transfers, the error mapping and
``close`` are overridden, because adlfs's ``put_file``/``get_file`` hand a whole file to
``upload_blob``/``download_blob`` with the SDK's defaults, which read any blob up to
``max_single_put_size`` (64 MiB) into memory in one PUT and fetch the first 32 MiB of a download in one
GET (issue 3 measured 1.1 GB peak RSS for 8 files of 64 MiB that way). Here every request carries at
most ``chunkbytes`` of a file, and a large file has several blocks (upload) or ranges (download) in
flight at once, all files of the store drawing on one :class:`ByteBudget` of ``inflightbytes``: the
memory of the transfers follows the budget, not the number or sizes of the files (issue 13).
Get Blob and Put Blob go as REST requests through the SDK's own pipeline
(:mod:`sidecar.providers.azureblob.rest`: a ``BlobClient`` and its header parsing per request cost
more CPU than a small file's transfer); blocks, block lists and properties through the SDK's clients.

Verification (issue 3: "size, and MD5 where the service records one"):

- upload: the MD5 of the file is computed while it is read, in file order, in a worker thread (each
  block's own MD5 in another, so the two hashes use two cores). A file of at most ``chunkbytes`` goes in
  one Put Blob carrying it as the transactional ``Content-MD5``: the service rejects a body that does
  not hash to it (``Md5Mismatch``, retried) and records it as the blob's MD5. So does a file of at most
  ``maxsingleputbytes``, hashed in a first read and streamed from the file in a second. A larger file
  goes as Put Block (each block with its own transactional MD5) and Put Block List recording the whole
  file's MD5; the blob's properties are then read back and their size and MD5 compared with what was sent.
- download: the ranges of one version of the blob (``If-Match`` its ETag: a first answer without one is
  refused when other ranges follow, as is one telling another size than expected), several in flight, each
  received into a reused buffer, are written at their offsets and hashed in file order, one
  worker-thread call per range; the MD5 is compared with the one the service returns with the blob
  (``x-ms-blob-content-md5``) and with the size and MD5 in the event meta.

Prefect's task retries are the only retry layer, so the SDK's retry policy is set to zero retries.
Errors: authentication failures, a missing blob or container on download and other 4xx answers are
:class:`~sidecar.errors.DataPlaneError` (not retried); connection errors, timeouts, 408/429/5xx and
MD5 mismatches and a blob overwritten during its download (412) are
:class:`~sidecar.errors.DataPlaneUnavailable` (retried). Every request has a total deadline scaled by
the bytes it moves (:class:`RequestDeadline`); past it the request is cancelled and the call fails with
:class:`~sidecar.errors.DataPlaneTimeout` (HTTP 503, not retried: a wait that used its bound). Sources: Azure Storage
REST docs (Put Blob, Put Block, Put Block List, Get Blob) and azure-storage-blob 12.x.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import hashlib
import os
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, AsyncIterator, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from adlfs import AzureBlobFileSystem
from azure.core.pipeline.transport import AioHttpTransport
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.utils import parse_connection_string
from azure.storage.blob import (
    BlobBlock,
    BlobSasPermissions,
    ContentSettings,
    UserDelegationKey,
    generate_blob_sas,
)
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from sidecar.dataplane.blobs import (STORE, BlobInfo, BlobVerificationError, check_key, download_verified,
                                     upload_verified)
from sidecar.dataplane.credentials import USER_DELEGATION_MAX_SECONDS, CredentialKind, ProviderCredential, token_credential
from sidecar.dataplane.errors import first_line, permanent, transient, translated
from sidecar.errors import DataPlaneTimeout, DataPlaneUnavailable
from sidecar.providers.azureblob.config import AzureBlobConfig
from sidecar.providers.azureblob.rest import BlobRest

T = TypeVar("T")

# Put Block List accepts at most this many blocks (Azure Storage scalability targets).
MAX_BLOCKS = 50_000

# Reads, writes and hashes of at least this many bytes run in a worker thread, so the event loop keeps
# serving the other transfers; smaller ones are cheaper inline than a thread hop.
_THREAD_BYTES = 256 * 1024


class _OneTlsContextTransport(AioHttpTransport):
    """azure-core's aiohttp transport, building its TLS context once instead of on every request.

    With ``connection_verify`` naming a CA bundle, ``AioHttpTransport._build_ssl_config`` creates a new
    ``ssl.SSLContext`` and reads the bundle for every request (azure-core 1.41), even over plain HTTP;
    aiohttp then pools connections per context, so none is reused. Measured on 1000 blobs of 4 KiB:
    77% of the sidecar's CPU and 16x the plain client's time. The context depends only on its
    arguments, so one per (cert, verify) serves every request. The configured one is built with the
    transport, at start-up: built in the first request, it cost a child's first ``/ready`` about 15 ms of
    CPU (py-spy, bench/azure_transfers.py).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._build_ssl_config(self.connection_config.cert, self.connection_config.verify)

    def _build_ssl_config(self, cert: Any, verify: Any) -> Any:
        cache = self.__dict__.setdefault("_tls_contexts", {})
        key = (tuple(cert) if isinstance(cert, (list, tuple)) else cert, verify)
        if key not in cache:
            cache[key] = super()._build_ssl_config(cert, verify)
        return cache[key]


class RequestDeadline:
    """The total time one blob service request may take: ``floor`` seconds, plus its bytes at
    ``bytes_per_second``; from ``--azureblobprovider.connecttimeoutseconds`` + ``.readtimeoutseconds``
    (the floor: a connection and a first answer) and ``.minbytespersecond``.

    The client's ``read_timeout`` bounds only the gap between two reads: azure-core 1.41's
    ``AioHttpTransport.send`` builds ``aiohttp.ClientTimeout(sock_connect=..., sock_read=...)`` and no
    ``total``, and the storage SDK's ``timeout=`` keyword is the service's server-side timeout (a URI
    parameter the client never enforces). So a peer that sends a byte every few seconds held a request,
    and ``/ready`` or ``/done``, for ever. The service's own limits are far looser (Get Blob: 2 minutes
    per MiB; Put Blob and Put Block: 10 minutes per MiB; Put Block List: 60 s; Azure Storage REST docs,
    "Setting timeouts for Blob service operations"). :meth:`bound` wraps the whole SDK call, the
    response body included, in ``asyncio.timeout``.

    Args:
        floor: seconds every request may take whatever its size.
        bytes_per_second: the slowest a request may move its bytes (request or response body), bytes/s.
    """

    def __init__(self, floor: float, bytes_per_second: float):
        self.floor = floor
        self.bytes_per_second = bytes_per_second

    def seconds(self, nbytes: int) -> float:
        """The deadline of a request moving ``nbytes`` bytes, seconds."""
        return self.floor + nbytes / self.bytes_per_second

    @contextlib.asynccontextmanager
    async def bound(self, request: str, where: str, nbytes: int = 0) -> AsyncIterator[None]:
        """Run the ``async with`` body (one request ``request``, e.g. ``"Put Block"``, on ``where``,
        moving ``nbytes`` bytes) within :meth:`seconds`.

        Raises:
            DataPlaneTimeout: the deadline passed; the request was cancelled, which closes its
                connection (aiohttp), so nothing of it is committed later by this process (a Put Block
                List is only sent after every block was acknowledged).
        """
        seconds = self.seconds(nbytes)
        timeout = asyncio.timeout(seconds)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise  # not this deadline's
            raise DataPlaneTimeout(STORE, f"{where}: {request} ({nbytes} bytes) did not finish within {seconds:.1f} s "
                                          "(--azureblobprovider.connecttimeoutseconds + .readtimeoutseconds + "
                                          "its bytes at .minbytespersecond)") from None


class _AzureFileSystem(AzureBlobFileSystem):
    """adlfs whose service client has bounded request sizes, timeouts and no SDK retries.

    adlfs builds its ``BlobServiceClient`` in ``do_connect`` without a way to pass client options,
    so this override builds it with ``client_options`` (keyword arguments of ``BlobServiceClient``).
    """

    def __init__(self, *, client_options: dict[str, Any], account_url: str, **kwargs: Any):
        self._client_options = client_options
        self._account_url = account_url
        super().__init__(**kwargs)

    def do_connect(self) -> None:
        options = {**self._client_options, "transport": _OneTlsContextTransport(**self._client_options)}
        if self.connection_string:
            self.service_client = BlobServiceClient.from_connection_string(self.connection_string, **options)
        else:
            self.service_client = BlobServiceClient(
                self._account_url,
                credential=self.credential or {"account_name": self.account_name, "account_key": self.account_key},
                **options)


class AzureBlobStore:
    """BlobStore (``sidecar.dataplane.blobs``) on one Azure Blob container, with bounded memory per
    transfer. Transfers go through the shared :func:`~sidecar.dataplane.blobs.upload_verified` and
    :func:`~sidecar.dataplane.blobs.download_verified` with this provider's :meth:`_put`, :meth:`_get`
    and :meth:`translate`.

    Args:
        fs: the adlfs file system, its service client configured by :func:`azure_blob_store`.
        container: the container name; keys are blob names inside it.
        chunkbytes: the most bytes of a file held per request (block size and range size), bytes.
        signer: ``(key, seconds) -> url`` for read-only SAS URLs, or None when no account key is known.
        credential: the token credential to close with the store, if one was made for it.
        inflightbytes: the most bytes of file data all transfers hold at once (:class:`ByteBudget`).
        sas_seconds: the lifetime of the URLs :meth:`url` makes, seconds (0: none).
        deadline: the total deadline of each request (:class:`RequestDeadline`).
        single_put_bytes: files above ``chunkbytes`` and at most this size go up as one streamed Put
            Blob (:meth:`_put_streamed`), larger ones as blocks, bytes.
    """

    def __init__(self, fs: _AzureFileSystem, container: str, chunkbytes: int,
                 signer: Callable[[str, int], str] | None, credential: ProviderCredential | None,
                 inflightbytes: int, sas_seconds: int, deadline: RequestDeadline, single_put_bytes: int = 0):
        self.fs = fs
        self.single_put_bytes = single_put_bytes
        self.deadline = deadline
        self.container = container
        self.sas_seconds = sas_seconds
        self._signer = signer
        self.chunkbytes = chunkbytes
        self.credential = credential
        self._budget = ByteBudget(max(chunkbytes, inflightbytes), MAX_REQUESTS_IN_FLIGHT)
        self._buffers = BlockBuffers(chunkbytes, max(chunkbytes, inflightbytes) // chunkbytes)
        self._range_buffers = BlockBuffers(chunkbytes, max(chunkbytes, inflightbytes) // chunkbytes)
        self._client = fs.service_client.get_container_client(container)
        self._rest = BlobRest(self._client)
        self._container_ready = False
        self._container_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"Azure Blob Storage, container '{self.container}'"

    def blob_url(self, key: str) -> str:
        """The URL of blob ``key`` (no credentials in it), quoted as the SDK's ``BlobClient.url`` is;
        built directly because a ``BlobClient`` per recorded file costs more than the string."""
        return self._rest.url(key)

    async def upload(self, local: Path, key: str) -> BlobInfo:
        """``BlobStore.upload``; with a user-delegation signer, first makes sure its key is fresh (an
        async call the synchronous :meth:`url` cannot make), so the event's SAS URL can be signed."""
        if isinstance(self._signer, UserDelegationSigner):
            await self._signer.refresh()
        return await upload_verified(local, key, self._put, self.info, self.translate)

    async def download(self, key: str, local: Path, expected: BlobInfo | None = None) -> BlobInfo:
        """``BlobStore.download``: ranges of ``chunkbytes``, MD5 checked against what the service and
        ``expected`` record; a blob whose size is not ``expected``'s is refused by its first answer
        (``BlobVerificationError``), before any other range is asked."""
        return await download_verified(key, local, expected, self._get, self.translate)

    async def info(self, key: str) -> BlobInfo | None:
        """Size and recorded MD5 of blob ``key`` (Get Blob Properties), or None when it does not exist."""
        check_key(key)
        with translated(self.translate, key):
            try:
                async with self.deadline.bound("Get Blob Properties", self._where(key)):
                    props = await self._client.get_blob_client(key).get_blob_properties()
            except ResourceNotFoundError:
                return None
        return BlobInfo(key, int(props.size), _hex(props.content_settings.content_md5))

    def url(self, key: str) -> str | None:
        """A read-only SAS URL of blob ``key`` valid ``sas_seconds``: account-key SAS, or
        user-delegation SAS with a token credential; None without a signing key or with 0 seconds."""
        if self._signer is None or self.sas_seconds <= 0:
            return None
        return self._signer(key, self.sas_seconds)

    async def close(self) -> None:
        """Close the service client's HTTP session and the token credential's."""
        await self.fs.service_client.close()
        if self.credential is not None:
            await self.credential.close()

    async def _ensure_container(self) -> None:
        """Create the container once per process if it is missing (issue 3: created on upload)."""
        if self._container_ready:
            return
        async with self._container_lock:
            if not self._container_ready:
                try:
                    async with self.deadline.bound("Create Container", f"container '{self.container}'"):
                        await self._client.create_container()
                except ResourceExistsError:
                    pass
                self._container_ready = True

    async def _put(self, local: Path, key: str) -> BlobInfo:
        await self._ensure_container()
        try:
            with open(local, "rb") as f:
                size = _fstat_size(f)
                if size <= self.chunkbytes:
                    async with self._budget.hold(size):
                        data, digest = await _offload(size, _read_md5, f, size)
                        async with self.deadline.bound("Put Blob", self._where(key), size):
                            stored = await self._rest.put(key, data, len(data), digest)
                    _check_md5(key, _hex(stored), digest.hex(), "stored")
                    return BlobInfo(key, len(data), digest.hex())
                if size <= self.single_put_bytes:
                    return await self._put_streamed(key, f.fileno(), size)
                blob = self._client.get_blob_client(key)
                whole, blocks = await self._put_blocks(blob, f, size)
            recorded = ContentSettings(content_md5=bytearray(whole.digest()))
            # The request body lists each block as <Latest>base64 id</Latest>: about 32 bytes a block.
            async with self.deadline.bound("Put Block List", self._where(key), 32 * len(blocks)):
                await blob.commit_block_list(blocks, content_settings=recorded)
            async with self.deadline.bound("Get Blob Properties", self._where(key)):
                props = await blob.get_blob_properties()
        except ResourceNotFoundError:
            # The container vanished after this process created it: create it again on the retry.
            self._container_ready = False
            raise DataPlaneUnavailable(STORE, f"{self._where(key)}: container was deleted during upload") from None
        md5 = _hex(props.content_settings.content_md5)
        _check_md5(key, md5, whole.hexdigest(), "stored")
        if props.size != size:
            raise BlobVerificationError(key, f"stored {props.size}, sent {size} bytes")
        return BlobInfo(key, int(props.size), md5)

    async def _put_streamed(self, key: str, fd: int, size: int) -> BlobInfo:
        """Upload the first ``size`` bytes of file ``fd`` as one Put Blob whose body is read from the file
        as it is sent, after a first read that hashes them: the service checks the body against that MD5
        (the transactional ``Content-MD5``; ``Md5Mismatch`` if the file changed in between) and records
        it as the blob's. The file is hashed once, where blocks hash every byte twice (each block for its
        Put Block, the whole file for the blob), and one request replaces the blocks, the block list and
        the properties read: 8 files of 64 MiB at once cost the sidecar 1.0 s of CPU against 1.9-2.0 s as
        8 MiB blocks, and Azurite 1.7-2.0 s against 2.4-2.9 s (bench/azure_transfers_results.md).

        The SDK's ``upload_blob`` reads a single put's whole body into memory first
        (``upload_block_blob``, azure-storage-blob 12.x); here the request (:meth:`BlobRest.put`) reads it
        from the file as it is sent, so a file holds about two pieces of :data:`_PIECE_BYTES`.

        Raises:
            BlobVerificationError: the file ended before ``size`` bytes, or the service's MD5 differs.
            HttpResponseError: the service refused (as ``upload_blob`` raises it).
        """
        async with self._budget.hold(2 * _PIECE_BYTES):
            digest, got = await _in_thread(_pread_md5, fd, size)
            if got != size:
                raise BlobVerificationError(key, f"the file changed while read: {got} of {size} bytes")
            async with self.deadline.bound("Put Blob", self._where(key), size):
                stored = await self._rest.put(key, _file_pieces(fd, size, key), size, digest)
        _check_md5(key, _hex(stored), digest.hex(), "stored")
        return BlobInfo(key, size, digest.hex())

    async def _put_blocks(self, blob: BlobClient, f: IO[bytes], size: int) -> tuple[Any, list[BlobBlock]]:
        """Stage ``f`` as blocks, several in flight under the store's byte budget; returns the whole
        file's MD5 (updated in file order by the one reader) and the block list to commit."""
        # A blob has at most 50,000 blocks: only files above that many chunks get larger blocks.
        block_size = max(self.chunkbytes, -(-size // MAX_BLOCKS))
        whole = hashlib.md5()
        blocks: list[BlobBlock] = []

        async def stage(block_id: str, data: bytes | bytearray, length: int) -> None:
            try:
                # The block's own MD5 in another thread than the reader's whole-file MD5: two cores.
                digest = await asyncio.to_thread(_md5, data)
                async with self.deadline.bound("Put Block", self._where(blob.blob_name), len(data)):
                    await blob.stage_block(block_id, _pieces(data), length=len(data), transactional_content_md5=digest)
                # Sent and acknowledged (the service checked its MD5): the buffer can take the next block.
                # After a failure it is dropped instead, in case the connection still holds it.
                self._buffers.give(data)
            finally:
                self._budget.release(length)

        with self._buffers.in_use():
            async with _first_error_group() as group:
                for offset in range(0, size, block_size):
                    length = min(block_size, size - offset)
                    await self._budget.acquire(length)
                    try:
                        buffer = self._buffers.take(length)
                        got = await _in_thread(_read_into_md5, f, buffer, whole)
                        if got != length:
                            raise BlobVerificationError(blob.blob_name, f"the file changed while read: {offset + got} "
                                                                        f"of {size} bytes")
                        data = buffer
                        del buffer
                    except BaseException:
                        self._budget.release(length)
                        raise
                    # Block ids must all have the same length; the SDK base64-encodes them.
                    block_id = f"{len(blocks):06d}"
                    blocks.append(BlobBlock(block_id))
                    group.create_task(stage(block_id, data, length))
                    del data
        return whole, blocks

    async def _get(self, key: str, local: Path, size_hint: int | None = None) -> str:
        # The first GET asks for up to chunkbytes and tells the blob's size, MD5 and ETag.
        held = self.chunkbytes if size_hint is None else min(size_hint, self.chunkbytes)
        await self._budget.acquire(held)
        try:
            async with self.deadline.bound("Get Blob", self._where(key), held):
                answer = await self._rest.get(key, 0, held)
                try:
                    if answer.size is None:  # as download_blob: the blob's size is needed, and unknown
                        raise BlobVerificationError(key, "the answer to its first range has no Content-Range")
                    if not answer.etag and answer.size > answer.length:
                        # Without If-Match the other ranges could come from another version (download_blob
                        # then sends none): a blob overwritten meanwhile, with no MD5, came back mixed.
                        raise BlobVerificationError(key, "the answer to its first range has no ETag to ask "
                                                         "the other ranges of the same version")
                    size, recorded, etag = answer.size, _hex(answer.md5), answer.etag
                    if size_hint is not None and size != size_hint:
                        # Refused after the download anyway (download_verified): not a byte more is
                        # fetched. An event meta of 10 bytes for a blob since overwritten with gigabytes
                        # filled the module's volume with them first.
                        raise BlobVerificationError(key, f"is {size} bytes, expected {size_hint} bytes")
                    if answer.length > max(held, 1):
                        raise BlobVerificationError(key, f"{answer.length} bytes answered for its first {held}")
                    # Received into a buffer of the ranges' pool (given back once written, in _get_ranges):
                    # joined from the transport's pieces, each file's first chunk cost a second copy.
                    first = self._range_buffers.take(answer.length)
                    got = await answer.read_into(first)
                    if got != answer.length:
                        raise BlobVerificationError(key, f"received {got} of the {answer.length} bytes announced")
                finally:
                    await answer.close()
                del answer
        except BaseException:
            self._budget.release(held)
            raise
        digest = hashlib.md5()
        try:
            f = open(local, "wb")
        except BaseException:
            self._budget.release(held)  # a file that cannot be opened must not keep the budget
            raise
        with f:
            if len(first) >= size:
                try:
                    await _offload(len(first), _write_md5, f, first, digest)
                finally:
                    self._budget.release(held)
                if len(first) != size:
                    raise BlobVerificationError(key, f"received {len(first)} of {size} bytes")
            else:
                ranges = self._get_ranges(key, f.fileno(), first, held, size, etag, digest)
                # Only the coroutine holds the first chunk now, and drops it once it is written: kept here,
                # each file held a chunk outside the byte budget to its end (8 files of 64 MiB at once
                # rose 155 MiB above idle, 4 files 95 MiB; tracemalloc at the peak: every file's first chunk).
                del first
                await ranges
        received = digest.hexdigest()
        if recorded:
            _check_md5(key, received, recorded, "received")
        return received

    async def _get_ranges(self, key: str, fd: int, first: bytearray, held: int, size: int, etag: str,
                          digest: Any) -> None:
        """Fetch the rest of a blob after its ``first`` bytes as ranges of ``chunkbytes``, several in
        flight under the byte budget and all from one version of the blob (``If-Match: etag``). One task
        takes the ranges in file order and, in one worker-thread call per range, writes it at its offset
        and adds it to ``digest``; a range's budget is released once it is written and hashed.

        One call per range, not a write as each range arrives and a hash later: under load every worker
        thread hop waited about as long as the request itself (8 x 64 MiB at load 8: 115 ms per hop,
        360 ms per 4 MiB request), and the range held its budget through both hops."""
        try:
            os.ftruncate(fd, size)
        except BaseException:
            self._budget.release(held)
            raise

        async def fetch(offset: int, length: int) -> bytes | bytearray:
            buffer = self._range_buffers.take(length)
            async with self.deadline.bound(f"Get Blob (range at {offset})", self._where(key), length):
                got = await _range_into(self._rest, key, offset, buffer, etag)
            if got != length:
                raise BlobVerificationError(key, f"range at {offset}: received {got} of {length} bytes")
            return buffer

        async def fetched(data: bytes) -> bytes:
            return data

        # (offset, range being fetched, bytes of budget it holds) in file order; None ends the writing.
        order: asyncio.Queue[tuple[int, asyncio.Task[bytes], int] | None] = asyncio.Queue()

        async def write_in_order() -> None:
            while (item := await order.get()) is not None:
                offset, task, length = item
                try:
                    data = await task
                    await _in_thread(_pwrite_md5, fd, data, offset, digest)
                    self._range_buffers.give(data)  # written and hashed: it can take the next range
                finally:
                    self._budget.release(length)
                del task, item, data

        try:
            with self._range_buffers.in_use():
                async with _first_error_group() as group:
                    group.create_task(write_in_order())
                    order.put_nowait((0, group.create_task(fetched(first)), held))
                    offset = len(first)
                    del first
                    try:
                        while offset < size:
                            length = min(self.chunkbytes, size - offset)
                            await self._budget.acquire(length)
                            order.put_nowait((offset, group.create_task(fetch(offset, length)), length))
                            offset += length
                    finally:
                        order.put_nowait(None)
        finally:
            # After a failure: give back the budget of ranges the writing task never took.
            while not order.empty():
                if (item := order.get_nowait()) is not None:
                    self._budget.release(item[2])

    def _where(self, key: str) -> str:
        return f"blob '{key}' in container '{self.container}'"

    def translate(self, exc: Exception, key: str) -> BaseException:
        """The blob store's error for an Azure SDK exception on blob ``key`` (the shape of
        ``sidecar.dataplane.errors``): refused (auth, 4xx, missing) is permanent; connection errors,
        timeouts, 408/429/5xx, a blob changed mid-download and MD5 mismatches are retried."""
        where = self._where(key)
        if isinstance(exc, HttpResponseError) and exc.status_code is not None:
            # process_storage_error re-raises a 200/204 as it came, without error_code.
            error_code = getattr(exc, "error_code", None)
            code = str(getattr(error_code, "value", error_code) or exc.reason or "")
            detail = f"{where}: HTTP {exc.status_code} {code}: {first_line(str(exc.message or ''))}"
            if code.lower() == "md5mismatch":
                return BlobVerificationError(key, detail)
            if exc.status_code == 412:
                # If-Match failed: the blob was overwritten between two ranges; a retry reads one version.
                return transient(STORE, where, text=f"{where} changed while it was downloaded (HTTP 412 {code})")
            if isinstance(exc, ResourceNotFoundError):
                return permanent(STORE, where, text=f"{where} does not exist ({code})")
            if isinstance(exc, ClientAuthenticationError) or exc.status_code in (401, 403):
                return permanent(STORE, where, text=f"{where}: authentication failed: HTTP {exc.status_code} {code}")
            if exc.status_code in (408, 429) or exc.status_code >= 500:
                return transient(STORE, where, text=detail)
            return permanent(STORE, where, text=detail)
        if isinstance(exc, ClientAuthenticationError):
            # Raised before any request, e.g. an account key that is not base64.
            return permanent(STORE, where, text=f"{where}: authentication failed: {type(exc).__name__}")
        # Connection refused or reset, timeouts (ServiceRequestError, ServiceResponseError, OSError).
        return transient(STORE, where, text=f"{where}: {type(exc).__name__}: {first_line(str(exc))}")


class UserDelegationSigner:
    """Read-only SAS URLs signed with a user-delegation key (Microsoft Entra ID), never an account key.

    The key comes from Get User Delegation Key (the identity needs a role with
    ``Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey``, e.g. Storage Blob
    Delegator or Storage Blob Data Contributor). It is fetched once, valid for the 7 days the service
    allows, and reused until it would expire within ``seconds`` + :attr:`MARGIN` of now; a SAS cannot
    outlive its key. Source: Azure Storage REST docs, "Create a user delegation SAS".

    Args:
        service: the blob service client (token credential); ``container``: the container name;
        blob_url: ``key -> url`` of a blob; ``seconds``: the SAS lifetime the flows ask for, seconds;
        deadline: the total deadline of the key's request (:class:`RequestDeadline`).
    """

    MARGIN = 300  # seconds: clock skew and the time between signing and the child's download

    def __init__(self, service: BlobServiceClient, container: str, blob_url: Callable[[str], str], seconds: int,
                 deadline: RequestDeadline):
        self.service = service
        self.deadline = deadline
        self.container = container
        self.blob_url = blob_url
        self.seconds = seconds
        self.key: UserDelegationKey | None = None
        self._lock = asyncio.Lock()

    def _lasts(self, seconds: int) -> bool:
        if self.key is None:
            return False
        expiry = datetime.fromisoformat(self.key.signed_expiry.replace("Z", "+00:00"))
        return expiry >= datetime.now(timezone.utc) + timedelta(seconds=seconds + self.MARGIN)

    async def refresh(self) -> None:
        """Fetch a new user-delegation key unless the one held lasts ``seconds`` + margin more.

        Raises:
            DataPlaneError: the service refused (e.g. the identity lacks the delegator role).
            DataPlaneUnavailable: the service or the credential could not answer.
        """
        if self._lasts(self.seconds):
            return
        async with self._lock:
            if self._lasts(self.seconds):
                return
            now = datetime.now(timezone.utc)
            with translated(_delegation_error, "Get User Delegation Key"):
                async with self.deadline.bound("Get User Delegation Key", "the blob service"):
                    self.key = await self.service.get_user_delegation_key(
                        now - timedelta(seconds=self.MARGIN),
                        now + timedelta(seconds=USER_DELEGATION_MAX_SECONDS - self.MARGIN))

    def __call__(self, key: str, seconds: int) -> str:
        """A read-only user-delegation SAS URL of blob ``key`` valid ``seconds`` seconds.

        Raises:
            DataPlaneUnavailable: no key lasts that long (``refresh`` was not awaited since it aged).
        """
        if not self._lasts(seconds - self.MARGIN):
            raise DataPlaneUnavailable(STORE, f"no user delegation key lasting {seconds} s to sign blob '{key}'")
        token = generate_blob_sas(
            account_name=self.service.account_name, container_name=self.container, blob_name=key,
            user_delegation_key=self.key, permission=BlobSasPermissions(read=True),
            expiry=datetime.now(timezone.utc) + timedelta(seconds=seconds))
        return f"{self.blob_url(key)}?{token}"


def _delegation_error(exc: Exception, what: str = "Get User Delegation Key") -> BaseException:
    """The blob store's error for a failed Get User Delegation Key (the shape of
    ``sidecar.dataplane.errors``): refused is permanent, the rest retried."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code = str(getattr(exc.error_code, "value", exc.error_code) or exc.reason or "")
        if exc.status_code in (408, 429) or exc.status_code >= 500:
            return transient(STORE, what, text=f"{what}: HTTP {exc.status_code} {code}")
        if exc.status_code == 401 or code in ("AuthenticationFailed", "InvalidAuthenticationInfo"):
            return permanent(STORE, what, text=f"{what}: authentication failed: HTTP {exc.status_code} {code}")
        hint = " (user-delegation SAS URLs need a role such as Storage Blob Delegator)" if exc.status_code == 403 else ""
        return permanent(STORE, what, text=f"{what} refused: HTTP {exc.status_code} {code}{hint}")
    return transient(STORE, what, text=f"{what}: {type(exc).__name__}: {first_line(str(exc))}")


def azure_blob_store(cfg: AzureBlobConfig) -> AzureBlobStore:
    """The Azure Blob provider for ``cfg`` (``--azureblobprovider.*``). Opens no connection yet.

    Args:
        cfg: ``credential`` ``key`` with ``connectionstring`` (Azurite or any endpoint; wins when set)
            or ``blobaccountname`` and ``blobaccountkey``; or a token ``credential``
            (:mod:`sidecar.dataplane.credentials`) with ``clientid`` and ``accounturl`` (default
            ``https://{blobaccountname}.blob.core.windows.net``), whose SAS URLs are user-delegation
            SAS (:class:`UserDelegationSigner`); ``containername``; ``chunkbytes`` (bytes per
            request); ``connecttimeoutseconds``/``readtimeoutseconds`` (per phase) and with
            ``minbytespersecond`` each request's total deadline (:class:`RequestDeadline`); ``sasexpiryseconds``.
            ``SSL_CERT_FILE``, when set, names the CA bundle the client trusts instead of the system's.

    Raises:
        ValueError: the connection string cannot be parsed (the message holds no secret).
    """
    chunk = max(1, int(cfg.chunkbytes))
    deadline = RequestDeadline(cfg.connecttimeoutseconds + cfg.readtimeoutseconds, cfg.minbytespersecond)
    client_options: dict[str, Any] = {
        "retry_total": 0,
        "max_single_put_size": chunk,
        "max_block_size": chunk,
        "max_single_get_size": chunk,
        "max_chunk_get_size": chunk,
        "connection_timeout": cfg.connecttimeoutseconds,
        "read_timeout": cfg.readtimeoutseconds,
        # The storage SDK gives its own transport 256 KiB (DATA_BLOCK_SIZE), but one built here would get
        # azure-core's 4 KiB: a 4 MiB range then arrived as 1024 reads joined in Python, which cost 8x
        # 64 MiB downloads as much CPU as their MD5 (131,760 reads of the response vs 2,767).
        "connection_data_block_size": 256 * 1024,
    }
    # aiohttp builds its default TLS context when first imported; a CA bundle named later is passed on.
    if os.environ.get("SSL_CERT_FILE"):
        client_options["connection_verify"] = os.environ["SSL_CERT_FILE"]
    token: ProviderCredential | None = None
    if cfg.credential is not CredentialKind.key:
        token = token_credential(cfg.credential, cfg.clientid, STORE)
        account, account_key = cfg.blobaccountname, ""
        endpoint = cfg.accounturl.rstrip("/") or f"https://{account}.blob.core.windows.net"
        credentials: dict[str, Any] = {"account_name": account, "credential": token}
    elif cfg.connectionstring:
        try:
            parts = parse_connection_string(cfg.connectionstring, case_sensitive_keys=False)
        except ValueError:
            raise ValueError("azureblobprovider.connectionstring is not a valid connection string") from None
        account, account_key = parts.get("accountname", ""), parts.get("accountkey", "")
        endpoint = parts.get("blobendpoint") or (f"{parts.get('defaultendpointsprotocol', 'https')}://{account}"
                                                 f".blob.{parts.get('endpointsuffix', 'core.windows.net')}")
        credentials = {"connection_string": cfg.connectionstring}
    else:
        account, account_key = cfg.blobaccountname, cfg.blobaccountkey
        endpoint = f"https://{account}.blob.core.windows.net"
        credentials = {"account_name": account, "account_key": account_key}
    # With use_env_settings (the default) aiohttp re-reads ~/.netrc and the proxy variables in a worker
    # thread on every request: about a third of the client's CPU on small blobs. The one endpoint's
    # proxy, if any, is resolved from the same variables once instead.
    client_options["use_env_settings"] = False
    proxy = env_proxy(endpoint)
    if proxy:
        client_options["proxies"] = {urlparse(endpoint).scheme: proxy}
    # asynchronous=False only gives adlfs fsspec's I/O loop for the close it registers to run at exit
    # (with no loop that hook fails noisily); the store awaits the "_" coroutines on the caller's loop.
    fs = _AzureFileSystem(client_options=client_options, account_url=endpoint, asynchronous=False,
                          skip_instance_cache=True, use_listings_cache=False, **credentials)
    store: AzureBlobStore

    def sign(key: str, seconds: int) -> str:
        """A read-only SAS URL of blob ``key`` valid ``seconds`` seconds (signed with the account key)."""
        token = generate_blob_sas(
            account_name=account, container_name=cfg.containername, blob_name=key, account_key=account_key,
            permission=BlobSasPermissions(read=True), expiry=datetime.now(timezone.utc) + timedelta(seconds=seconds))
        return f"{store.blob_url(key)}?{token}"

    signer: Callable[[str, int], str] | None
    if token is None:
        signer = sign if account and account_key else None
    else:
        signer = None if cfg.sasexpiryseconds <= 0 else UserDelegationSigner(
            fs.service_client, cfg.containername, lambda key: store.blob_url(key), cfg.sasexpiryseconds, deadline)
    store = AzureBlobStore(fs, cfg.containername, chunk, signer, token, cfg.inflightbytes, cfg.sasexpiryseconds,
                           deadline, cfg.maxsingleputbytes)
    _return_large_buffers_to_the_os()
    return store


# The budget bounds the bytes held, but not what the C allocator keeps after they are freed: glibc
# raises its mmap threshold to the size of each large buffer freed (up to 32 MiB), so after the first
# block or range, 4 MiB buffers come from per-thread arenas (one per worker thread that read, hashed or
# joined one) and fragment there. A fixed threshold keeps every buffer of this size mmapped and given back
# to the OS when freed: 4 files of 64 MiB at once rose 97-134 MiB above idle with a 32 MiB budget
# (tests/azure/rss_probe.py), 76-88 MiB with it.
_MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def _return_large_buffers_to_the_os() -> None:
    """Make the C allocator mmap allocations of ``_MMAP_THRESHOLD`` bytes or more (process-wide; a
    no-op where libc has no ``mallopt``, e.g. macOS)."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def env_proxy(url: str) -> str | None:
    """The proxy for ``url`` from ``HTTP(S)_PROXY``/``NO_PROXY`` (standard library rules), or None."""
    host = urlparse(url).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlparse(url).scheme)


# The most blocks and ranges (one HTTP request each) all transfers of a store have in flight at once, any
# chunk size: below aiohttp's 100 connections per session, so no request waits for a connection inside
# aiohttp while its read timeout runs and its bytes are held.
MAX_REQUESTS_IN_FLIGHT = 64


class ByteBudget:
    """At most ``limit`` bytes of file data held by transfers at once, first come first served.

    One budget is shared by every transfer of a store, so memory is bounded by the budget whatever the
    number and sizes of files; a request larger than ``limit`` holds the whole budget.

    With ``max_holders``, every hold is charged at least ``limit / max_holders`` bytes, so the same budget
    also bounds the number of requests in flight, whatever the chunk size (64 KiB chunks under a 32 MiB
    budget would otherwise put 512 requests of one file on the wire at once).

    Args:
        limit: bytes (at least 1).
        max_holders: the most holds granted at once (None: only bytes count).
    """

    def __init__(self, limit: int, max_holders: int | None = None):
        self.limit = max(1, int(limit))
        self.free = self.limit
        self.floor = -(-self.limit // max_holders) if max_holders else 1
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` (capped at ``limit``) are free and hold them; FIFO, so a large request
        is not overtaken for ever by small ones. Cancelling the wait holds nothing."""
        nbytes = self._charge(nbytes)
        if not self._waiting and nbytes <= self.free:
            self.free -= nbytes
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((nbytes, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(nbytes)  # granted just as the wait was cancelled
            else:
                self._waiting.remove((nbytes, waiter))
                self._wake()
            raise

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` (capped at ``limit``) held by :meth:`acquire`."""
        self.free += self._charge(nbytes)
        self._wake()

    def _charge(self, nbytes: int) -> int:
        """What a hold of ``nbytes`` takes from the budget: at least ``floor``, at most ``limit``."""
        return min(max(nbytes, self.floor), self.limit)

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            nbytes, waiter = self._waiting.popleft()
            if not waiter.done():
                self.free -= nbytes
                waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` for the ``async with`` block."""
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


class BlockBuffers:
    """Buffers of ``size`` bytes for the blocks of uploads (or, in a pool of their own, the ranges of
    downloads: :func:`_range_into`), reused: at most ``keep`` are kept (what the byte budget lets be in
    flight at once, so the kept ones stay within the budget's memory).

    Each large buffer is its own mmap (``_MMAP_THRESHOLD``): a block read into a fresh ``bytes`` cost
    1,024 page faults to fill and an munmap to free, and the transport's copies of a whole block as many
    again (:func:`_pieces`). Both together: a 256 MiB upload went from 139,000-190,000 minor faults
    and 0.45-0.55 s of system CPU to none and 0.12 s, and the user CPU dropped a little too.
    The kept buffers are freed when the last upload using them ends (:meth:`in_use`), so they do not
    add to the memory of the downloads that follow (tests/azure/rss_probe.py: kept for good, they
    raised its peak by their 32 MiB). Used from the event loop's thread only.
    """

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._users = 0

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark one upload as using the buffers for the ``with`` block; the last one out frees them."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                self._free.clear()

    def take(self, length: int) -> bytearray:
        """A buffer of exactly ``length`` bytes: a kept one when ``length`` is ``size``, else a new one."""
        if length == self.size and self._free:
            return self._free.pop()
        return bytearray(length)

    def give(self, buffer: bytes | bytearray) -> None:
        """Keep ``buffer`` for a later :meth:`take` if it is a full-size buffer and fewer than ``keep`` are kept."""
        if isinstance(buffer, bytearray) and len(buffer) == self.size and len(self._free) < self.keep:
            self._free.append(buffer)


@contextlib.asynccontextmanager
async def _first_error_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An ``asyncio.TaskGroup`` that raises its first error itself rather than an ExceptionGroup, so the
    store's error translation sees the SDK's exception (the first failure cancels the other tasks)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        first = next((e for e in errors.exceptions if not isinstance(e, asyncio.CancelledError)), errors.exceptions[0])
        raise first from None


# The pieces a block is handed to aiohttp in (:func:`_pieces`): under glibc's mmap threshold, so the
# transport's copies of what the socket did not take at once come from the heap and are reused.
_PIECE_BYTES = 256 * 1024


async def _pieces(block: bytes | bytearray) -> AsyncIterator[memoryview]:
    """``block`` as views of ``_PIECE_BYTES``, for a request body (azure-core and aiohttp accept an async
    iterable; the request's Content-Length comes from the length given with it).

    A block passed whole is joined with the request's headers into one new buffer and, when the socket
    takes only part of it, copied again (Python 3.11's ``WriteTransport.writelines`` and
    ``_SelectorSocketTransport.write``): two fresh 4 MiB allocations per block. Pieces are sent one by
    one with aiohttp's flow control between them."""
    view = memoryview(block)
    for start in range(0, len(view), _PIECE_BYTES):
        yield view[start:start + _PIECE_BYTES]


async def _range_into(rest: BlobRest, key: str, offset: int, buffer: bytearray, etag: str) -> int:
    """Receive the ``len(buffer)`` bytes of blob ``key`` at ``offset`` (Get Blob with a range,
    ``If-Match: etag``, :meth:`BlobRest.get`) into ``buffer``; returns how many bytes came (more than
    fit raises).

    ``BlobClient.download_blob`` joins a range's pieces into a new bytes object (``process_content``,
    azure-storage-blob 12.x): with large buffers mmapped (:data:`_MMAP_THRESHOLD`), each 8 MiB range cost
    2,048 page faults to fill and an munmap to free, about 0.35 s of system CPU per 512 MiB received
    (``getrusage`` around 8 x 64 MiB downloads, 107,000 faults against none). Here its pieces (the
    transport's ``connection_data_block_size``) are copied into a buffer the store reuses (:class:`BlockBuffers`).

    Raises:
        HttpResponseError: the service refused (as ``download_blob`` raises it: ``process_storage_error``).
        BlobVerificationError: the answer held more bytes than the range asked for.
    """
    answer = await rest.get(key, offset, len(buffer), etag)
    try:
        return await answer.read_into(buffer)
    finally:
        await answer.close()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, awaited to its end even when the caller is cancelled (the
    cancellation is raised after it).

    Cancelling ``asyncio.to_thread`` does not stop its thread. The calls here read or write a file the
    caller closes on its way out (``with open(...)``, :meth:`AzureBlobStore._get`): a thread still
    running then wrote into, or read from, whichever file or socket the process opened next under the
    same descriptor number; a failed download's range landed in another download's partial file, whose
    MD5 is computed from the bytes received and still matched (tests/azure/test_range_answers.py).
    """
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise


async def _offload(nbytes: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread (:func:`_in_thread`) when it touches ``nbytes`` or more,
    else inline."""
    if nbytes >= _THREAD_BYTES:
        return await _in_thread(fn, *args)
    return fn(*args)


def _read_md5(f: IO[bytes], size: int) -> tuple[bytes, bytes]:
    """Read up to ``size`` bytes; returns them and their MD5."""
    data = f.read(size)
    return data, hashlib.md5(data).digest()


def _pread_md5(fd: int, size: int) -> tuple[bytes, int]:
    """The MD5 of the first ``size`` bytes of file ``fd`` (read at offsets: its position is not moved)
    and how many there were (fewer when the file is shorter)."""
    digest, got = hashlib.md5(), 0
    buffer = bytearray(_PIECE_BYTES)
    view = memoryview(buffer)
    while got < size and (n := os.preadv(fd, [view[:min(len(view), size - got)]], got)):
        digest.update(view[:n])
        got += n
    return digest.digest(), got


async def _file_pieces(fd: int, size: int, key: str) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of file ``fd`` as a request body, read as they are sent in new bytes
    objects of :data:`_PIECE_BYTES` at most (a piece the socket does not take at once stays queued in the
    transport, so a reused buffer could change under it).

    Read inline, not in a worker thread: a piece of a file just hashed comes from the page cache in tens
    of microseconds, and a thread hop per piece cost 8 x 64 MiB uploads 0.15-0.4 s more CPU (and wall).

    Raises:
        BlobVerificationError: the file ended before ``size`` bytes.
    """
    sent = 0
    while sent < size:
        piece = os.pread(fd, min(_PIECE_BYTES, size - sent), sent)
        if not piece:
            raise BlobVerificationError(key, f"the file changed while read: {sent} of {size} bytes")
        sent += len(piece)
        yield piece


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def _read_into_md5(f: IO[bytes], buffer: bytearray, whole: Any) -> int:
    """Fill ``buffer`` from ``f`` (short only at the end of the file) and add what was read to
    ``whole``; returns the number of bytes read."""
    view = memoryview(buffer)
    got = 0
    while got < len(buffer) and (n := f.readinto(view[got:])):
        got += n
    whole.update(view[:got])
    return got


def _write_md5(f: IO[bytes], data: bytes, digest: Any) -> None:
    f.write(data)
    digest.update(data)


def _pwrite_md5(fd: int, data: bytes, offset: int, digest: Any) -> None:
    """Write all of ``data`` at ``offset`` of file ``fd`` and add it to ``digest``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    digest.update(data)


def _fstat_size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def _hex(digest: bytes | bytearray | None) -> str | None:
    return bytes(digest).hex() if digest else None


def _check_md5(key: str, got: str | None, want: str, what: str) -> None:
    if got != want:
        raise BlobVerificationError(key, f"{what} MD5 {got}, expected {want}")

