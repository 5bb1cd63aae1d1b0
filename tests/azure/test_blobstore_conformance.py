"""The BlobStore conformance suite: the same tests, unchanged, against every blob provider.

``store`` (tests/azure/conftest.py) is the development provider (files on disk) and the Azure provider
on Azurite with 64 KiB blocks, so files above that size take the chunked path. DESIGN.md: one
conformance suite per protocol runs unchanged against every provider of that slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from sidecar.dataplane.blobs import BlobInfo, BlobStore, BlobVerificationError, gather_bounded
from sidecar.errors import DataPlaneError, is_transient

pytestmark = pytest.mark.anyio

# Sizes that cover an empty file, one small request and several blocks of the test chunk size.
SIZES = {"empty.txt": 0, "a.txt": 13, "sub/dir/b.bin": 200 * 1024 + 7, "sub/c.bin": 64 * 1024}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def test_round_trip_keeps_bytes_and_relative_paths(store: BlobStore, tmp_path: Path) -> None:
    contents = {rel: os.urandom(size) for rel, size in SIZES.items()}
    infos = {}
    for rel, data in contents.items():
        infos[rel] = await store.upload(write(tmp_path / "out" / rel, data), f"evt-1/producer/{rel}")
        assert infos[rel].key == f"evt-1/producer/{rel}" and infos[rel].size == len(data)
        assert infos[rel].md5 in (None, md5(data))
    for rel, data in contents.items():
        got = await store.download(f"evt-1/producer/{rel}", tmp_path / "in" / rel, infos[rel])
        assert got.size == len(data)
        assert (tmp_path / "in" / rel).read_bytes() == data
    staged = sorted(p.relative_to(tmp_path / "in").as_posix() for p in (tmp_path / "in").rglob("*") if p.is_file())
    assert staged == sorted(contents), "no partial or extra files are left behind"


async def test_info_reports_size_or_none(store: BlobStore, tmp_path: Path) -> None:
    await store.upload(write(tmp_path / "f.bin", b"x" * 1000), "k/f.bin")
    info = await store.info("k/f.bin")
    assert info is not None and info.size == 1000 and info.md5 in (None, md5(b"x" * 1000))
    assert await store.info("k/absent.bin") is None


async def test_overwrite_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    first = await store.upload(write(tmp_path / "v1", os.urandom(150 * 1024)), "k/file")
    data = os.urandom(3000)
    again = [await store.upload(write(tmp_path / "v2", data), "k/file") for _ in range(2)]
    assert again[0] == again[1] and again[0].size == 3000 and again[0] != first
    await store.download("k/file", tmp_path / "in" / "file", again[1])
    assert (tmp_path / "in" / "file").read_bytes() == data


async def test_missing_blob_is_a_permanent_error_naming_it(store: BlobStore, tmp_path: Path) -> None:
    await store.upload(write(tmp_path / "x", b"x"), "k/x")  # the container exists; the blob does not
    with pytest.raises(DataPlaneError) as caught:
        await store.download("k/nope.bin", tmp_path / "in" / "nope.bin")
    assert "k/nope.bin" in caught.value.message and not is_transient(caught.value)
    assert not any((tmp_path / "in").rglob("*.bin*")), "no partial file is left"


@pytest.mark.parametrize("wrong", ["size", "md5"])
async def test_download_verifies_size_and_md5(store: BlobStore, tmp_path: Path, wrong: str) -> None:
    data = os.urandom(100 * 1024)
    info = await store.upload(write(tmp_path / "f", data), "k/f")
    if wrong == "size":
        expected = BlobInfo("k/f", len(data) + 1, md5(data))
    else:
        expected = BlobInfo("k/f", len(data), md5(b"other"))
    target = tmp_path / "in" / "f"
    with pytest.raises(BlobVerificationError) as caught:
        await store.download("k/f", target, expected)
    assert "k/f" in caught.value.message and is_transient(caught.value), "a mismatch is retried by the task"
    assert not target.exists() and not list(target.parent.glob(".*partial")), "nothing half-verified is left"
    await store.download("k/f", target, BlobInfo("k/f", len(data), md5(data)))
    assert target.read_bytes() == data and info.size == len(data)


async def test_transfers_run_in_parallel_within_the_bound(store: BlobStore, tmp_path: Path) -> None:
    in_flight = peak = 0
    put = store._put

    async def counting_put(local: Path, key: str):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.05)  # hold the slot so overlapping transfers are observable
            return await put(local, key)
        finally:
            in_flight -= 1

    store._put = counting_put  # type: ignore[method-assign]
    files = [write(tmp_path / f"f{i}", os.urandom(2000)) for i in range(12)]
    infos = await gather_bounded(asyncio.Semaphore(3), [store.upload(f, f"k/f{i}") for i, f in enumerate(files)])
    assert [i.size for i in infos] == [2000] * 12
    assert peak == 3


async def test_first_failure_stops_the_batch(store: BlobStore, tmp_path: Path) -> None:
    await store.upload(write(tmp_path / "ok", b"ok"), "k/ok")
    jobs = [store.download("k/ok", tmp_path / "in" / f"ok{i}") for i in range(3)] + \
        [store.download("k/missing", tmp_path / "in" / "missing")]
    with pytest.raises(DataPlaneError):
        await gather_bounded(asyncio.Semaphore(2), jobs)


async def test_signed_url_is_read_only_and_serves_the_bytes(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(5000)
    await store.upload(write(tmp_path / "f", data), "k/signed.bin")
    assert store.url("k/signed.bin", 0) is None, "0 seconds means no URL"
    url = store.url("k/signed.bin", 120)
    if url is None:
        return  # a provider without a signing key records no URL
    async with httpx.AsyncClient() as client:
        got = await client.get(url)
        assert got.status_code == 200 and got.content == data
        put = await client.put(url, content=b"overwrite", headers={"x-ms-blob-type": "BlockBlob"})
        assert put.status_code == 403
