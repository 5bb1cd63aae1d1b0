"""Get Blob and Put Blob as REST requests sent through the storage SDK's own pipeline.

``BlobClient.download_blob``/``upload_blob`` cost about 1 ms of CPU per request on top of the request
itself: a ``BlobClient`` built per blob, and the generated operation's deserialisation of some forty
response headers (dates included) the store never reads. Measured on Azurite, 1000 blobs of 4 KiB, 64
at once, CPU seconds of the client: Get Blob 1.01-1.03 through ``download_blob`` against 0.43-0.48
here, Put Blob 0.89-1.03 through ``upload_blob`` against 0.50-0.55. On 2 cores shared with the service,
that CPU was most of what a sidecar's small files cost beyond a plain client's (issue 13).

The requests go through the container client's pipeline, so they carry what the SDK's would: the
same authentication (shared key or Entra ID token), ``x-ms-date``, client request id, user agent and
``x-ms-version`` (the client's API version), the same transport (timeouts, connection pool, 256 KiB
reads) and no retries (Prefect's task retries are the only layer). A refusal is raised as the generated
layer raises it and then passed through ``process_storage_error`` as ``BlobClient`` does, so callers
see the SDK's own exceptions (``ResourceNotFoundError``, ``ResourceModifiedError``, an
``HttpResponseError`` with its ``error_code``). Bodies are read raw (``iter_raw``): the bytes stored,
never decompressed, are the bytes hashed; a body that is not blob data (an error's, Put Blob's) is read
up to ``MAX_ANSWER_BYTES`` only. A Get Blob answer is taken only when its ``Content-Range`` (when
given) starts at the offset asked and spans its ``Content-Length``, its ETag (when given) is the one
asked ``If-Match``, and its MD5 header (when given) is an MD5 in base64: a cache or proxy in between
answering another slice, another version or a compressed body is refused (``BlobVerificationError``),
where the SDK's ``download_blob`` takes it.

Sources: Azure Storage REST API, "Get Blob" and "Put Blob" (headers ``x-ms-range``, ``If-Match``,
``Content-Range``, ``x-ms-blob-content-md5``, ``Content-MD5``, ``x-ms-blob-type``); the headers the
generated operations of azure-storage-blob 12.x send (``_generated/operations/_blob_operations.py``,
``_block_blob_operations.py``).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ResourceNotModifiedError,
    map_error,
)
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.storage.blob._shared.response_handlers import process_storage_error
from azure.storage.blob.aio import ContainerClient

from sidecar.dataplane.blobs import BlobVerificationError

# The generated operations' error map (before process_storage_error reads the error code).
_ERROR_MAP = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError,
              304: ResourceNotModifiedError}
# The first and last bytes answered, when given, and the total after the slash, read as the SDK reads
# the total (parse_length_from_content_range): Azurite answers a range of an empty blob with
# "bytes 0--1/0" where Azure refuses it (416).
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(-?\d+))?\S*/(\d+)")
# The most bytes read of a body that is not blob data (an error's XML, Put Blob's empty body): Azure's
# error bodies are a few hundred bytes, and the generated layer would read whatever a server or proxy
# sends there into memory, whole (64 MiB offered, 64 MiB taken).
MAX_ANSWER_BYTES = 64 * 1024


@dataclass
class BlobAnswer:
    """A Get Blob answer whose body has not been read yet.

    Attributes:
        key: the blob's name.
        size: the whole blob's size, bytes (from ``Content-Range``; 0 for an empty blob), or None when
            the answer did not say (no ``Content-Range``).
        length: the bytes of this answer's body (``Content-Length``).
        md5: the blob's recorded MD5 (16 bytes), or None when it has none.
        etag: the version answered (for ``If-Match`` on the next ranges).
        response: the azure-core response; its body is read once, by :meth:`read_into`.
    """

    key: str
    size: int | None
    length: int
    md5: bytes | None
    etag: str
    response: AsyncHttpResponse

    async def read_into(self, buffer: bytearray) -> int:
        """Copy the body, raw, into ``buffer`` as it arrives; returns how many bytes came.

        Raises:
            BlobVerificationError: the body held more than ``len(buffer)`` bytes (nothing more is read).
        """
        view, got = memoryview(buffer), 0
        async for piece in self.response.iter_raw():
            if got + len(piece) > len(view):
                raise BlobVerificationError(self.key, f"more than the {len(view)} bytes asked for in one answer")
            view[got:got + len(piece)] = piece
            got += len(piece)
        return got

    async def close(self) -> None:
        """Release the connection (at once when the body was read to its end)."""
        await self.response.close()


class BlobRest:
    """Get Blob and Put Blob on the blobs of one container, through the container client's pipeline.

    Args:
        container: the SDK's container client (its pipeline, URL and API version are used).
    """

    def __init__(self, container: ContainerClient):
        self._pipeline = container._pipeline  # noqa: SLF001 - the SDK's own policies and transport
        # A SAS credential (a connection string's SharedAccessSignature) is the query of the client's URL:
        # every request carries it after the blob's path; the URLs recorded for people never do.
        parts = urlsplit(container.url)
        self._url = urlunsplit(parts._replace(query=""))
        self._query = f"?{parts.query}" if parts.query else ""
        self._version = container.api_version

    def url(self, key: str) -> str:
        """The URL of blob ``key`` without credentials, quoted as ``BlobClient.url`` quotes it."""
        return f"{self._url}/{quote(key, safe='~/')}"

    async def get(self, key: str, offset: int, length: int, etag: str | None = None) -> BlobAnswer:
        """Get Blob for the ``length`` bytes at ``offset`` (``x-ms-range``), of version ``etag`` when
        given (``If-Match``). An empty blob refuses a range starting at 0 (HTTP 416): it is then asked
        for whole, and answers with no body (as ``download_blob`` does).

        Raises:
            HttpResponseError: the service refused (the SDK's subclass for it).
            BlobVerificationError: the empty blob's second answer has a body (it changed in between),
                the answer's ``Content-Range`` starts elsewhere than ``offset`` or spans another
                length than its ``Content-Length``, its ETag is not ``etag``, or its MD5 header is not
                a base64 MD5.
        """
        end = offset + max(length, 1) - 1
        response = await self._send("GET", key, {"x-ms-range": f"bytes={offset}-{end}"}, etag)
        whole = False
        if response.status_code == 416 and offset == 0:
            await _read_small(response)
            response = await self._send("GET", key, {}, etag)
            whole = True
        if response.status_code not in (200, 206):
            await _refused(response)
        try:
            headers = response.headers
            answered = int(headers.get("Content-Length") or 0)
            found = _CONTENT_RANGE.fullmatch(headers.get("Content-Range") or "")
            if whole and answered:
                raise BlobVerificationError(key, f"empty when its range was asked for, {answered} bytes right after")
            if found and found[1] is not None:
                # A cache that ignores ranges answers another slice, with the length asked; a proxy that
                # compresses sends fewer bytes than the range spans: with no MD5 recorded or expected,
                # nothing else would tell.
                if int(found[1]) != offset:
                    raise BlobVerificationError(key, f"answered the bytes at {found[1]} for the range at {offset}")
                spans = int(found[2]) - offset + 1
                if "Content-Length" in headers and spans != answered:
                    raise BlobVerificationError(key, f"its Content-Range spans {spans} bytes, its body {answered}")
            size = int(found[3]) if found else 0 if whole else None
            version = headers.get("ETag") or ""
            if etag and version and version != etag:
                # A cache that ignores If-Match answers from the version it saw before.
                raise BlobVerificationError(key, f"answered ETag {version} for the range at {offset} asked of {etag}")
            name = "x-ms-blob-content-md5" if headers.get("x-ms-blob-content-md5") or not whole else "Content-MD5"
            return BlobAnswer(key, size, answered, _md5_header(key, name, headers.get(name)), version, response)
        except BaseException:
            await response.close()
            raise

    async def put(self, key: str, body: bytes | AsyncIterable[bytes], length: int, md5: bytes) -> bytes | None:
        """Put Blob (a block blob, overwriting) of ``length`` bytes from ``body`` (bytes, or an async
        iterable of bytes sent as it yields), checked by the service against ``md5`` (transactional
        ``Content-MD5``: ``Md5Mismatch`` if the body differs) and recorded as the blob's MD5
        (``x-ms-blob-content-md5``). Returns the MD5 the service computed (its ``Content-MD5``), or None.
        The answer's body (empty from Azure) is read up to :data:`MAX_ANSWER_BYTES`, then dropped.

        Raises:
            HttpResponseError: the service refused (the SDK's subclass for it).
            BlobVerificationError: the answer's ``Content-MD5`` is not a base64 MD5 (16 bytes).
        """
        encoded = base64.b64encode(md5).decode()
        headers = {"x-ms-blob-type": "BlockBlob", "Content-Length": str(length), "Content-MD5": encoded,
                   "x-ms-blob-content-md5": encoded,
                   # Sent by the SDK too; aiohttp adds it to a body otherwise, after it was signed without.
                   "Content-Type": "application/octet-stream"}
        response = await self._send("PUT", key, headers, None, body)
        if response.status_code != 201:
            await _refused(response)
        await _read_small(response)
        return _md5_header(key, "Content-MD5", response.headers.get("Content-MD5"))

    async def _send(self, method: str, key: str, headers: dict[str, str], etag: str | None,
                    body: Any = None) -> AsyncHttpResponse:
        headers = {**headers, "x-ms-version": self._version, "Accept": "application/xml"}
        if etag:
            headers["If-Match"] = etag
        request = HttpRequest(method, self.url(key) + self._query, headers=headers, content=body)
        return (await self._pipeline.run(request, stream=True)).http_response


def _md5_header(key: str, name: str, value: str | None) -> bytes | None:
    """The MD5 (16 bytes) in header ``name`` of an answer about blob ``key``, or None when it has none.

    Raises:
        BlobVerificationError: the value is not 16 bytes in base64 (a lenient decode took some for
            "no MD5" and let a download go unchecked: ``b64decode("****")`` is empty).
    """
    if not value:
        return None
    try:
        md5 = base64.b64decode(value, validate=True)
    except ValueError:
        md5 = b""
    if len(md5) != 16:
        raise BlobVerificationError(key, f"the answer's {name} {value[:64]!r} is not a base64 MD5")
    return md5


async def _read_small(response: AsyncHttpResponse) -> bytes:
    """Read ``response``'s body, raw, up to :data:`MAX_ANSWER_BYTES`, as its ``content`` (where
    ``process_storage_error`` and ``HttpResponseError`` read it); a longer body is cut there and its
    connection closed, the rest never read."""
    length = response.headers.get("Content-Length") or ""
    if length.isdigit() and int(length) <= MAX_ANSWER_BYTES:
        return await response.read()  # aiohttp reads no more than Content-Length; the connection is kept
    body = bytearray()
    pieces = response.iter_raw()
    try:
        async for piece in pieces:
            body += piece[:MAX_ANSWER_BYTES - len(body)]
            if len(body) >= MAX_ANSWER_BYTES:
                break
    finally:
        await pieces.aclose()
        await response.close()
    response._content = bytes(body)  # noqa: SLF001 - what read() would have set, within the bound
    return response._content  # noqa: SLF001


async def _refused(response: AsyncHttpResponse) -> NoReturn:
    """Raise what ``BlobClient`` raises for this refusal: the generated layer's error
    (``map_error``, else ``HttpResponseError``) through ``process_storage_error``, from at most
    :data:`MAX_ANSWER_BYTES` of its body (the generated layer would read it all)."""
    await _read_small(response)
    try:
        map_error(status_code=response.status_code, response=response, error_map=_ERROR_MAP)
        raise HttpResponseError(response=response)
    except HttpResponseError as error:
        process_storage_error(error)
