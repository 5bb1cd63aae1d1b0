"""BlobStore: the blob building block of the data plane, and what every blob provider shares.

Providers: ``sidecar.providers.azureblob`` (Azure Blob Storage) and ``sidecar.providers.localblob``
(development: files under ``{devdir}/blobs``), chosen by ``sidecar.dataplane.registry``. The flows see
only :class:`BlobStore`. Every provider moves files through :func:`upload_verified` and
:func:`download_verified`, which check the key first (:func:`check_key`), verify size and MD5, never
leave a partial file behind, tell the module's volume (:func:`local_error`) from the service,
and translate the rest with the provider's ``translate`` (``sidecar.dataplane.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Protocol, TypeVar

from sidecar.dataplane.errors import Translate
from sidecar.errors import DataPlaneError, DataPlaneUnavailable, VolumeError
from sidecar.paths import name_problem, shown

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


class BlobStore(Protocol):
    """Stores blobs (files) under keys: relative POSIX names such as ``{eventid}/{module}/{path}``.

    Errors (``sidecar.dataplane.errors``): a service that cannot be reached raises
    :class:`~sidecar.errors.DataPlaneUnavailable` (``store="blob store"``); a refused request, a missing
    blob or a key that is not a good blob name (:func:`check_key`) raises
    :class:`~sidecar.errors.DataPlaneError`; a failure of the module's own volume raises
    :class:`~sidecar.errors.VolumeError`.
    """

    # Lifetime of the read-only URLs :meth:`url` makes, seconds (the provider's setting; 0: none).
    sas_seconds: int

    def describe(self) -> str:
        """Where blobs are kept, for people reading the run history (no secret)."""

    async def upload(self, local: Path, key: str) -> BlobInfo:
        """Copy the local file ``local`` to blob ``key`` (overwriting); returns what is stored, its
        size verified (and MD5 where the provider records one)."""

    async def download(self, key: str, local: Path, expected: BlobInfo | None = None) -> BlobInfo:
        """Copy blob ``key`` to ``local`` atomically, verified against ``expected`` (size, MD5) when
        given; a missing blob is a :class:`~sidecar.errors.DataPlaneError`."""

    async def info(self, key: str) -> BlobInfo | None:
        """Size (and MD5) of blob ``key``, or None when it does not exist."""

    def url(self, key: str) -> str | None:
        """A read-only URL to blob ``key`` valid ``sas_seconds`` seconds, or None where none can be
        made (no signing key, or a lifetime of 0)."""

    async def close(self) -> None:
        """Release connections."""


def check_key(key: str) -> None:
    """Refuse a key that is not a good blob name (``sidecar.paths.name_problem``: absolute, with
    ``.``/``..``/empty segments, ``\\``, control characters, ...), before any request, on every provider.

    Raises:
        DataPlaneError: naming the key.
    """
    problem = name_problem(key)
    if problem:
        raise DataPlaneError(STORE, f"blob key '{shown(key)}' {problem}")


# (local file, key) -> what was stored if the write tells (saves a round trip), else None.
Put = Callable[[Path, str], Awaitable["BlobInfo | None"]]
# (key, local file, expected size or None) -> the MD5 (hex) of the bytes written if computed, else None.
Get = Callable[[str, Path, "int | None"], Awaitable["str | None"]]


async def upload_verified(local: Path, key: str, put: Put, info: Callable[[str], Awaitable["BlobInfo | None"]],
                          translate: Translate) -> BlobInfo:
    """Upload ``local`` to ``key`` with the provider's ``put``, then verify the stored size.

    Raises:
        DataPlaneError: a bad key (:func:`check_key`), before any request.
        VolumeError: reading ``local`` failed on the module's volume.
        BlobVerificationError: the stored size differs (transient: retried by the task).
        DataPlaneUnavailable / DataPlaneError: the provider's ``translate(exc, key)``.
    """
    check_key(key)
    try:
        size = local.stat().st_size
        stored = await put(local, key) or await info(key)
    except (DataPlaneError, DataPlaneUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - translated to the sidecar's errors
        raise (local_error(exc, local) or translate(exc, key)) from exc
    if stored is None or stored.size != size:
        raise BlobVerificationError(key, f"stored {stored.size if stored else 'nothing'}, sent {size} bytes")
    return stored


async def download_verified(key: str, local: Path, expected: BlobInfo | None, get: Get,
                            translate: Translate) -> BlobInfo:
    """Download ``key`` to ``local`` with the provider's ``get`` into a partial file beside it, verify
    it against ``expected`` (size, then MD5), then rename it into place.

    Raises:
        DataPlaneError: a bad key (:func:`check_key`) before any request, or the blob does not exist
            (``FileNotFoundError`` from ``get``, or the provider's translation).
        VolumeError: writing below ``local`` failed on the module's volume.
        BlobVerificationError: the received size or MD5 differs (retried).
        DataPlaneUnavailable / DataPlaneError: the provider's ``translate(exc, key)``.
    """
    check_key(key)
    partial = partial_path(local)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        received_md5 = await get(key, partial, expected.size if expected else None)
    except Exception as exc:  # noqa: BLE001
        _discard(partial)
        if isinstance(exc, (DataPlaneError, DataPlaneUnavailable)):
            raise
        volume = local_error(exc, partial)
        if volume is not None:
            raise volume from exc
        if isinstance(exc, FileNotFoundError):
            raise DataPlaneError(STORE, f"blob '{key}' does not exist") from None
        raise translate(exc, key) from exc
    except BaseException:  # cancelled (a sibling failed): leave nothing behind in in/data
        _discard(partial)
        raise
    size = partial.stat().st_size
    if expected is not None and expected.size != size:
        _discard(partial)
        raise BlobVerificationError(key, f"received {size}, expected {expected.size} bytes")
    if expected is not None and expected.md5:
        received_md5 = received_md5 or await asyncio.to_thread(file_md5, partial)
        if received_md5 != expected.md5:
            _discard(partial)
            raise BlobVerificationError(key, f"received MD5 {received_md5}, expected {expected.md5}")
    try:
        os.replace(partial, local)
    except OSError as exc:
        _discard(partial)
        raise (local_error(exc, local) or exc) from exc
    return BlobInfo(key, size, expected.md5 if expected else None)


def _discard(partial: Path) -> None:
    """Remove a failed download's partial file, if any; a cleanup that fails (e.g. a folder at that
    name) must not hide the error being raised."""
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def partial_path(local: Path) -> Path:
    """Where a download into ``local`` is written before it is verified and renamed into place: a short
    name of its own beside it (``.{name}.partial`` would not fit beside a name of 250 bytes or more, a
    segment being at most 255). Beside ``local`` means in ``local``'s folder: that folder must be the
    caller's own, holding no name another party chooses, or the partial file could be (and replace, or
    delete) one of them. The ready flow downloads into ``in/.staging`` and then moves each verified
    file into ``in/data`` (``flows.ready``), never straight into ``in/data``."""
    return local.with_name(f".{hashlib.md5(os.fsencode(local.name)).hexdigest()[:16]}.partial")


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
        mine = {target, partial_path(target), *target.parents}
        hit = next((n for n in names if n in mine), None)
        return VolumeError(str(hit), exc) if hit is not None else None
    return VolumeError(str(target), exc) if exc.errno in LOCAL_ERRNOS else None


def file_md5(path: Path) -> str:
    """The MD5 (hex) of the file at ``path``, read in chunks (blocking: run it in a thread)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


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
