"""Development BlobStore: files under ``{devdir}/blobs`` on this machine, through fsspec."""

from __future__ import annotations

from pathlib import Path

from sidecar.dataplane.blobs import BlobStore, local_blob_store


def create(settings: None, devdir: Path) -> BlobStore:
    """The development blob store under ``devdir/blobs``."""
    return local_blob_store(devdir / "blobs")
