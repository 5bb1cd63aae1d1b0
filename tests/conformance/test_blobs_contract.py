"""Blob store conformance, the error contract and hostile names, for every blob provider.

Errors (``testsupport.contract``): a missing blob is permanent (``test_blobs.py``); an endpoint that
refuses connections is a retryable 503; credentials the service refuses are a permanent 502; no
message, traceback or log line carries the key or connection string. Names: every name of the hostile
corpus that the folder contract accepts is kept byte for byte and apart from its look-alikes; every
name it refuses is refused as a key, naming it, before any request.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sidecar.errors import DataPlaneError
from sidecar.paths import shown
from testsupport.contract import assert_no_secret, assert_refused, assert_unavailable, failure_of
from testsupport.hostile import ODD_NAMES, READY_CASES, REFUSED_NAMES, UNLISTABLE_NAMES
from testsupport.providers import Subject

pytestmark = pytest.mark.anyio

STORE = "blob store"
# Keys the store must refuse: the corpus's refused names below a producer's prefix, and the bad paths
# and keys of event metas written by someone else.
BAD_KEYS = [(f"evt/mod/{name}", detail) for name, _, detail in REFUSED_NAMES if isinstance(name, str)] + \
    [(path if what == "path" else key, case.detail) for case in READY_CASES if len(case.files) == 1
     for (path, key), what in [(case.files[0], case.what)]]


async def attempt(subject: Subject, flags: list[str], tmp_path: Path, action: str) -> BaseException:
    """Upload or download one blob with a provider opened on ``flags``; returns what it raised."""
    source = tmp_path / "f.txt"
    source.write_bytes(b"hello")
    if action == "upload":
        return await failure_of(subject, flags, lambda plane: plane.blobs.upload(source, "evt/mod/f.txt"))
    return await failure_of(subject, flags,
                            lambda plane: plane.blobs.download("evt/mod/f.txt", tmp_path / "in" / "f.txt"))


@pytest.mark.parametrize("action", ["upload", "download"])
async def test_unreachable_service_is_retryable_and_shows_no_secret(remote_blob_subject: Subject, tmp_path: Path,
                                                                    action: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exc = await attempt(remote_blob_subject, remote_blob_subject.unreachable, tmp_path, action)
    assert_unavailable(exc, STORE)
    assert "evt/mod/f.txt" in str(exc)
    assert_no_secret(remote_blob_subject, exc, caplog.text)


@pytest.mark.parametrize("action", ["upload", "download"])
async def test_refused_credentials_are_permanent_and_show_no_secret(remote_blob_subject: Subject, tmp_path: Path,
                                                                    action: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exc = await attempt(remote_blob_subject, remote_blob_subject.refused, tmp_path, action)
    assert_refused(exc, STORE)
    assert remote_blob_subject.provider.refusal_seen(remote_blob_subject, exc), "the service did not refuse"
    assert "evt/mod/f.txt" in str(exc)
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").iterdir()), "nothing half-written"
    assert_no_secret(remote_blob_subject, exc, caplog.text)


async def test_a_working_round_trip_logs_no_secret(blob_subject: Subject, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dataplane = blob_subject.dataplane()
    try:
        (tmp_path / "f").write_bytes(b"x" * 100_000)
        info = await dataplane.blobs.upload(tmp_path / "f", "evt/mod/f")
        await dataplane.blobs.download("evt/mod/f", tmp_path / "in" / "f", info)
        url = dataplane.blobs.url("evt/mod/f")
    finally:
        await dataplane.close()
    for secret in blob_subject.secrets:
        assert secret not in caplog.text and secret not in (url or "")


async def test_hostile_names_are_kept_apart_byte_for_byte(blob_subject: Subject, tmp_path: Path) -> None:
    dataplane = blob_subject.dataplane()
    names = ODD_NAMES + UNLISTABLE_NAMES
    assert len({n.casefold() for n in names}) < len(names), "the corpus holds look-alikes (Case.txt, case.txt)"
    contents = {name: f"{i}:{name}".encode() + os.urandom(i) for i, name in enumerate(names)}
    try:
        infos = {}
        for i, (name, data) in enumerate(contents.items()):
            source = tmp_path / "out" / str(i)
            source.parent.mkdir(exist_ok=True)
            source.write_bytes(data)
            infos[name] = await dataplane.blobs.upload(source, f"evt/mod/{name}")
            assert infos[name].key == f"evt/mod/{name}"
        # The service holds each name under exactly its key: none rewritten, none merged with another.
        assert blob_subject.stored_keys() == {f"evt/mod/{name}" for name in names}
        for i, (name, data) in enumerate(contents.items()):
            target = tmp_path / "in" / str(i)
            await dataplane.blobs.download(f"evt/mod/{name}", target, infos[name])
            assert target.read_bytes() == data, f"{name!r} came back as another blob"
    finally:
        await dataplane.close()


async def test_refused_keys_are_refused_before_any_request(blob_subject: Subject, tmp_path: Path) -> None:
    dataplane = blob_subject.dataplane()
    (tmp_path / "f").write_bytes(b"x")
    try:
        for key, detail in BAD_KEYS:
            for call in (dataplane.blobs.upload(tmp_path / "f", key), dataplane.blobs.download(key, tmp_path / "in" / "f"),
                         dataplane.blobs.info(key)):
                with pytest.raises(DataPlaneError) as caught:
                    await call
                assert f"'{shown(key)}'" in caught.value.message and detail in caught.value.message, key
    finally:
        await dataplane.close()
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").rglob("*"))
    assert not (blob_subject.devdir / "blobs").exists() or not any((blob_subject.devdir / "blobs").rglob("*"))
