"""Document store conformance, the error contract and hostile ids, for every document provider.

Errors (``testsupport.contract``): a missing document is None (``test_documents.py``); a server that
refuses connections is a 503 (answered once the server-selection bound is used: the module retries);
credentials the server refuses are a permanent 502; no message, traceback or log line carries the
password or the URI holding it. Ids: every event id the sidecar accepts (one good blob-name segment,
``sidecar.paths.segment_problem``, up to 255 bytes) is stored and found under exactly that id, apart
from its look-alikes, and every pair value of the hostile corpus comes back as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sidecar.paths import segment_problem
from testsupport.contract import assert_no_secret, assert_refused, assert_unavailable, failure_of
from testsupport.hostile import ODD_NAMES, ODD_VALUES, UNLISTABLE_NAMES
from testsupport.providers import DocumentSubject, insight, meta

pytestmark = pytest.mark.anyio

STORE = "document store"
# Event ids: the corpus's names that are one good segment, the longest segments (255 bytes, in 1-,
# 2- and 3-byte characters), and look-alikes that must stay apart (case, Unicode normalisation,
# percent-encoding of another id).
HOSTILE_IDS = [n for n in ODD_NAMES + UNLISTABLE_NAMES if segment_problem(n) is None] + [
    "n" * 255, "ü" * 127, "中" * 85, "EVT-1", "evt-1", "a%20b", "a b", "%", "$where", "_id", ".", "..x"]
HOSTILE_IDS = [i for i in HOSTILE_IDS if segment_problem(i) is None]


async def attempt(subject: DocumentSubject, flags: list[str], action: str) -> BaseException:
    """Read or write the event meta of ``evt-x`` with a provider opened on ``flags``; what it raised."""
    if action == "read":
        return await failure_of(subject, flags, lambda plane: plane.documents.get_event_meta("evt-x"))
    return await failure_of(subject, flags, lambda plane: plane.documents.upsert_event_metas([meta("evt-x")]))


@pytest.mark.parametrize("action", ["read", "write"])
async def test_unreachable_server_is_503_and_shows_no_secret(remote_document_subject: DocumentSubject, action: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exc = await attempt(remote_document_subject, remote_document_subject.unreachable, action)
    assert_unavailable(exc, STORE)
    assert "evt-x" in str(exc)
    assert_no_secret(remote_document_subject, exc, caplog.text)


@pytest.mark.parametrize("action", ["read", "write"])
async def test_refused_credentials_are_permanent_and_show_no_secret(remote_document_subject: DocumentSubject,
                                                                    action: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exc = await attempt(remote_document_subject, remote_document_subject.refused, action)
    assert_refused(exc, STORE)
    assert remote_document_subject.provider.refusal_seen(remote_document_subject, exc), "the server did not refuse"
    assert "evt-x" in str(exc)
    assert_no_secret(remote_document_subject, exc, caplog.text)


async def test_hostile_ids_and_values_are_kept_apart_as_they_are(document_subject: DocumentSubject,
                                                                 tmp_path: Path) -> None:
    assert len(HOSTILE_IDS) > 20
    dataplane = document_subject.dataplane()
    try:
        metas = [meta(i, label=f"{n}", **ODD_VALUES) for n, i in enumerate(HOSTILE_IDS)]
        await dataplane.documents.upsert_event_metas(metas)
        for n, i in enumerate(HOSTILE_IDS):
            await dataplane.documents.upsert_insight(insight(i, label=f"{n}"))
        for n, i in enumerate(HOSTILE_IDS):
            assert await dataplane.documents.get_event_meta(i) == metas[n], f"event meta {i!r}"
            assert await dataplane.documents.get_insight(i) == insight(i, label=f"{n}"), f"insight {i!r}"
            assert document_subject.copies("eventmeta", i) == 1 and document_subject.copies("insight", i) == 1
        assert await dataplane.documents.get_event_meta("n" * 254) is None
    finally:
        await dataplane.close()
