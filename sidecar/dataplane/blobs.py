"""BlobStore: the blob slot of the data plane, one class over fsspec.

Development mode uses fsspec's local file system below ``{devdir}/blobs``; the Azure provider uses
adlfs (``abfs://``) on a container. The flows see only :class:`BlobStore`, never the file system.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Iterable, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

from sidecar.errors import DataPlaneError, DataPlaneUnavailable, VolumeError
from sidecar.paths import name_problem, shown

log = logging.getLogger(__name__)

STORE = "blob store"
T = TypeVar("T")


@dataclass(frozen=True)
class BlobInfo:
    """What the store holds under ``key``: ``size`` in bytes and, where recorded, the MD5 (hex)."""

    key: str
    size: int
    md5: str | None = None


class BlobVerificationError(DataPlaneUnavailable):
    """A transferred blob's size or MD5 differs from the source. Transient: the task retries it."""

    def __init__(self, key: str, detail: str):
        super().__init__(STORE, f"blob '{key}' failed verification: {detail}")


class BlobStore:
    """Blobs under ``root`` of an fsspec file system, moved with bounded parallelism.

    Args:
        fs: any fsspec file system; a synchronous one is wrapped to be awaited.
        root: the prefix all keys live under (a folder, or an Azure container).
        signer: optional ``(key, seconds) -> url`` giving a read-only URL for a blob.
    """

    # Lifetime of the URLs :meth:`url` makes, seconds (the provider's setting; 0: none).
    sas_seconds: int = 0

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, signer: Any = None):
        self.fs: AsyncFileSystem = fs if fs.async_impl else AsyncFileSystemWrapper(fs)
        self.root = root.rstrip("/")
        self._signer = signer

    def describe(self) -> str:
        """Where blobs are kept, for people reading the run history (no secret)."""
        return f"files under {self.root}"

    def path(self, key: str) -> str:
        """The file system path of blob ``key``, confined below ``root``.

        Raises:
            DataPlaneError: ``key`` is not a good blob name (``sidecar.paths.name_problem``): absolute,
                with ``.``/``..``/empty segments, ``\\``, control characters, ... so no key leaves the
                container (or, in development mode, the blob folder).
        """
        problem = name_problem(key)
        if problem:
            raise DataPlaneError(STORE, f"blob key '{shown(key)}' {problem}")
        return f"{self.root}/{key}"

    async def upload(self, local: Path, key: str) -> BlobInfo:
        """Copy the local file ``local`` to blob ``key`` (overwriting) and verify its size.

        Raises:
            BlobVerificationError: the stored size differs (transient: retried by the task).
            DataPlaneUnavailable / DataPlaneError: from :meth:`_translate`; a bad key (:meth:`path`).
        """
        self.path(key)  # a bad key is refused before any request, whatever the provider's _put does
        try:
            size = local.stat().st_size
            # A provider whose write response already tells what was stored saves a round trip.
            info = await self._put(local, key) or await self.info(key)
        except Exception as exc:  # noqa: BLE001 - translated to the sidecar's errors
            raise (local_error(exc, local) or self._translate(exc, key)) from exc
        if info is None or info.size != size:
            raise BlobVerificationError(key, f"stored {info.size if info else 'nothing'}, sent {size} bytes")
        return info

    async def download(self, key: str, local: Path, expected: BlobInfo | None = None) -> BlobInfo:
        """Copy blob ``key`` to ``local`` (atomically: temp file, then rename) and verify it.

        Args:
            expected: size (and MD5) recorded when the blob was written; checked when given.

        Raises:
            DataPlaneError: the blob does not exist (not retried).
            BlobVerificationError: the received size or MD5 differs (retried).
            DataPlaneError: a bad key (:meth:`path`), before any request.
        """
        self.path(key)
        # A short name of its own beside the target: ".{name}.partial" would not fit beside a name of
        # 250 bytes or more (a segment is at most 255), and could be another input's name.
        partial = local.with_name(f".{hashlib.md5(os.fsencode(local.name)).hexdigest()[:16]}.partial")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            received_md5 = await self._get(key, partial, expected.size if expected else None)
        except Exception as exc:  # noqa: BLE001
            partial.unlink(missing_ok=True)
            volume = local_error(exc, partial)
            if volume is not None:
                raise volume from exc
            if isinstance(exc, FileNotFoundError):
                raise DataPlaneError(STORE, f"blob '{key}' does not exist") from None
            raise self._translate(exc, key) from exc
        except BaseException:  # cancelled (a sibling failed): leave nothing behind in in/data
            partial.unlink(missing_ok=True)
            raise
        size = partial.stat().st_size
        if expected is not None and expected.size != size:
            partial.unlink(missing_ok=True)
            raise BlobVerificationError(key, f"received {size}, expected {expected.size} bytes")
        if expected is not None and expected.md5:
            received_md5 = received_md5 or await asyncio.to_thread(file_md5, partial)
            if received_md5 != expected.md5:
                partial.unlink(missing_ok=True)
                raise BlobVerificationError(key, f"received MD5 {received_md5}, expected {expected.md5}")
        try:
            os.replace(partial, local)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise (local_error(exc, local) or exc) from exc
        return BlobInfo(key, size, expected.md5 if expected else None)

    async def info(self, key: str) -> BlobInfo | None:
        """Size (and MD5) of blob ``key``, or None when it does not exist."""
        try:
            raw = await self.fs._info(self.path(key))
        except FileNotFoundError:
            return None
        return BlobInfo(key, int(raw["size"]), _md5_of(raw))

    def url(self, key: str) -> str | None:
        """A read-only URL to blob ``key`` valid for the provider's SAS lifetime (``sas_seconds``), or
        None where none can be made (no signer, or a lifetime of 0)."""
        if self._signer is None or self.sas_seconds <= 0:
            return None
        return self._signer(key, self.sas_seconds)

    async def close(self) -> None:
        """Release connections (a no-op for local files)."""

    async def _put(self, local: Path, key: str) -> BlobInfo | None:
        """Write ``local`` to blob ``key``; returns what was stored if the write tells, else None."""
        await self.fs._put_file(str(local), self.path(key))
        return None

    async def _get(self, key: str, local: Path, size_hint: int | None = None) -> str | None:
        """Copy blob ``key`` to ``local``; returns the MD5 (hex) of the bytes written if computed.
        ``size_hint``: the size (bytes) the blob is expected to have, if known."""
        await self.fs._get_file(self.path(key), str(local))
        return None

    def _translate(self, exc: Exception, key: str) -> Exception:
        """Map a provider exception to DataPlaneUnavailable (retried) or DataPlaneError (not)."""
        if isinstance(exc, (DataPlaneUnavailable, DataPlaneError)):
            return exc
        if isinstance(exc, PermissionError):
            return DataPlaneError(STORE, f"blob '{key}': {exc}")
        return DataPlaneUnavailable(STORE, f"blob '{key}': {type(exc).__name__}: {exc}")


# Errors that only a local file system gives (a full or read-only volume, refused permissions, a
# file where a folder should be): without a file name they still mean the module's volume.
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST}


def local_error(exc: BaseException, local: Path) -> VolumeError | None:
    """The :class:`~sidecar.errors.VolumeError` for ``exc`` when it failed on the module's side of a
    transfer of ``local`` (a file under ``in/data`` or ``out/data``), else None (a data-plane error).

    An ``OSError`` naming a file is local when it names ``local``, its partial download or a folder
    above it; one naming no file is local when its errno is one only file systems give (``LOCAL_ERRNOS``).
    """
    if not isinstance(exc, OSError) or isinstance(exc, (ConnectionError, TimeoutError)):
        return None
    names = [Path(os.path.abspath(n)) for n in (exc.filename, exc.filename2) if isinstance(n, (str, os.PathLike))]
    target = Path(os.path.abspath(local))
    if names:
        mine = {target, target.with_name(f".{target.name}.partial"), *target.parents}
        hit = next((n for n in names if n in mine), None)
        return VolumeError(str(hit), exc) if hit is not None else None
    return VolumeError(str(target), exc) if exc.errno in LOCAL_ERRNOS else None


def _md5_of(raw: dict[str, Any]) -> str | None:
    settings = raw.get("content_settings") or {}
    digest = settings.get("content_md5") if isinstance(settings, dict) else getattr(settings, "content_md5", None)
    if not digest:
        return None
    return bytes(digest).hex() if not isinstance(digest, str) else digest


def file_md5(path: Path) -> str:
    """The MD5 (hex) of the file at ``path``, read in chunks (blocking: run it in a thread)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def local_blob_store(root: Path) -> BlobStore:
    """The development BlobStore: files below ``root`` on this machine. Keys are confined below
    ``root`` by :meth:`BlobStore.path` and follow the same naming rule as Azure's blob names."""
    root.mkdir(parents=True, exist_ok=True)
    return BlobStore(fsspec.filesystem("file", auto_mkdir=True), str(root.resolve()))


async def gather_all(jobs: Iterable[Awaitable[T]]) -> list[T]:
    """Await ``jobs`` concurrently in an ``asyncio.TaskGroup``; their results in order.

    Structured concurrency: when one job fails, every other is cancelled and has finished before this
    returns, so no transfer outlives the flow run that started it. A coroutine that never started is
    closed (cancelled before its first step).

    Raises:
        The first job's error itself (not the TaskGroup's ``ExceptionGroup``), so callers and the API
        see the sidecar's errors (``DataPlaneUnavailable``, ``VolumeError``, ...) unchanged.
    """
    error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
    except BaseExceptionGroup as group_error:
        error = _first(group_error)
    if error is not None:
        # Raised outside the except block, and without `from`: the error keeps the cause it was
        # raised from (is_transient reads it to tell a timeout), and gets no group as its context.
        raise error
    return [task.result() for task in tasks]


def _first(group_error: BaseExceptionGroup) -> BaseException:
    error: BaseException = group_error
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def gather_bounded(limit: asyncio.Semaphore, jobs: list[Awaitable[T]]) -> list[T]:
    """Await the coroutines ``jobs`` at most ``limit`` at a time (:func:`gather_all`: the first error
    cancels the rest and is raised once all have finished)."""

    async def one(job: Awaitable[T]) -> T:
        try:
            async with limit:
                return await job
        finally:
            close = getattr(job, "close", None)
            if close is not None:  # a job cancelled before it started: or Python warns it was never awaited
                close()

    return await gather_all(one(job) for job in jobs)
