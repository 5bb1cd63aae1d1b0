"""Development BlobStore: files under ``{devdir}/blobs`` on this machine, through fsspec's local file
system. Keys follow the same naming rule as Azure's blob names (``sidecar.dataplane.blobs.check_key``)
and are confined below the folder, links resolved (``sidecar.paths.confine``), so a module that passes
in development mode passes in production."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

from sidecar.dataplane.blobs import STORE, BlobInfo, download_verified, upload_verified
from sidecar.dataplane.errors import permanent, transient
from sidecar.paths import confine, shown


def translate(exc: Exception, key: str) -> BaseException:
    """The blob store's error for a local file system error on blob ``key`` (``sidecar.dataplane.errors``):
    refused permissions are permanent, anything else transient."""
    where = f"blob '{key}'"
    if isinstance(exc, PermissionError):
        return permanent(STORE, where, exc)
    return transient(STORE, where, exc)


class LocalBlobStore:
    """BlobStore (``sidecar.dataplane.blobs``) of one file per blob below ``root``.

    Args:
        root: the folder (created if missing); blob ``a/b`` is the file ``root/a/b``.
    """

    # No URL can be signed for a local file.
    sas_seconds = 0

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.fs = AsyncFileSystemWrapper(fsspec.filesystem("file", auto_mkdir=True))

    def describe(self) -> str:
        return f"files under {self.root}"

    def path(self, key: str) -> str:
        """The file of blob ``key``, confined below ``root`` (``sidecar.paths.confine``).

        Raises:
            DataPlaneError: ``key`` is not a good blob name or leads out of ``root``.
        """
        try:
            return str(confine(self.root, key))
        except ValueError as exc:
            raise permanent(STORE, "", text=f"blob key '{shown(key)}' {exc}") from None

    async def upload(self, local: Path, key: str) -> BlobInfo:
        return await upload_verified(local, key, self._put, self.info, translate)

    async def download(self, key: str, local: Path, expected: BlobInfo | None = None) -> BlobInfo:
        return await download_verified(key, local, expected, self._get, translate)

    async def info(self, key: str) -> BlobInfo | None:
        try:
            raw = await self.fs._info(self.path(key))
        except FileNotFoundError:
            return None
        # A folder here is the common prefix of other blobs' keys, which Azure holds as no blob at all.
        return BlobInfo(key, int(raw["size"])) if raw["type"] == "file" else None

    def url(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        pass

    async def _put(self, local: Path, key: str) -> BlobInfo | None:
        await self.fs._put_file(str(local), self.path(key))
        return None

    async def _get(self, key: str, local: Path, size_hint: int | None = None) -> str | None:
        path = self.path(key)
        if not os.path.isfile(path):
            # A folder (the prefix of other keys) is no blob, as on Azure (BlobNotFound): fsspec copied the
            # folder itself, and a meta giving its size (4,096) staged a folder as the input file.
            raise FileNotFoundError(errno.ENOENT, "no such blob", path)
        await self.fs._get_file(path, str(local))
        return None


def create(settings: None, devdir: Path) -> LocalBlobStore:
    """The development blob store under ``devdir/blobs``."""
    return LocalBlobStore(devdir / "blobs")
