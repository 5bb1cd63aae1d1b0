"""The MongoDB provider's own behaviour: how it connects (Cosmos-style URI, timeouts, no pymongo
retries, lazy start), the shape of its documents, and how failures map to 503/502."""

from __future__ import annotations

import time

import pytest
from pymongo.errors import BulkWriteError, OperationFailure
from pymongo.uri_parser import parse_uri

from sidecar.providers.mongo.config import MongoConfig
from sidecar.providers.mongo.store import MongoDocumentStore, client_options, cosmos_uri, retryable
from sidecar.errors import DataPlaneError, DataPlaneUnavailable
from sidecar.models import BlobFile, EventMeta, Insight, KeyValuePair
from testsupport.mongo import collection_name
from testsupport.blocking import Blocking
from testsupport.processes import free_port

PASSWORD = "p@ss:w/rd?%+ &=#ü=="


def test_cosmos_uri_as_the_original_connected() -> None:
    cfg = MongoConfig(enabled=True, name="acct", password=PASSWORD, collection="ion", port=10255)
    parsed = parse_uri(cosmos_uri(cfg))
    assert parsed["nodelist"] == [("acct.documents.azure.com", 10255)]
    assert (parsed["username"], parsed["password"]) == ("acct", PASSWORD)  # escaped, then decoded intact
    assert PASSWORD not in cosmos_uri(cfg)
    assert parsed["database"] == "acct"
    assert parsed["options"]["tls"] is True
    assert parsed["options"]["retryWrites"] is False

    sovereign = MongoConfig(name="acct", password="x", port=443, host="{name}.mongo.cosmos.azure.cn")
    assert parse_uri(cosmos_uri(sovereign))["nodelist"] == [("acct.mongo.cosmos.azure.cn", 443)]


@pytest.mark.parametrize("uri", ["", "mongodb://db.example:27017/mine?retryWrites=true&retryReads=true&appName=x"])
def test_client_options_timeouts_in_seconds_and_no_pymongo_retries(uri: str) -> None:
    cfg = MongoConfig(enabled=True, name="acct", password=PASSWORD, uri=uri, serverselectiontimeoutseconds=1.5,
                      connecttimeoutseconds=2.5, sockettimeoutseconds=3.5)
    store = Blocking(MongoDocumentStore(cfg))  # no server anywhere: opening does no network I/O
    metas, insights = store.call(store.inner.open)
    options = metas.database.client.options
    try:
        assert metas.database.name == ("mine" if uri else "acct")
        assert (metas.name, insights.name) == ("ion", "ion_insights")
        assert options.retry_writes is False and options.retry_reads is False  # Prefect's retries only
        assert options.server_selection_timeout == 1.5
        assert options.pool_options.connect_timeout == 2.5
        assert options.timeout == 3.5  # timeoutMS: the whole call, not each reply (socketTimeoutMS)
    finally:
        store.close()
    assert client_options(cfg)["serverSelectionTimeoutMS"] == 1500


def test_unreachable_server_is_unavailable_not_none() -> None:
    # Nothing listens on the port; the store starts anyway and each call answers a 503-class error.
    cfg = MongoConfig(enabled=True, uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
                      collection="c", serverselectiontimeoutseconds=0.3)
    store = Blocking(MongoDocumentStore(cfg))
    try:
        started = time.perf_counter()
        with pytest.raises(DataPlaneUnavailable) as raised:
            store.get_event_meta("evt-1")
        took = time.perf_counter() - started
        print(f"get_event_meta with the server down raised after {took:.2f}s")
        # The selection timeout (0.3 s; pymongo waits in 0.5 s steps), not the call's 30 s deadline
        # (pymongo's timeoutMS), which pymongo used for the selection instead.
        assert took < 5, f"a call against a server that is down took {took:.1f} s (serverselectiontimeoutseconds=0.3)"
        assert raised.value.status_code == 503 and raised.value.store == "document store"
        assert "event meta 'evt-1'" in raised.value.message
        with pytest.raises(DataPlaneUnavailable, match="insight 'exec-1'"):
            store.upsert_insight(Insight(id="exec-1", executionId="exec-1", eventId="e", correlationId="c",
                                         parentEventId="", name="m"))
    finally:
        store.close()


def test_documents_keyed_by_id_with_camelcase_fields(mongo_server) -> None:
    cfg = mongo_server.config(collection_name("shape"))
    store = Blocking(MongoDocumentStore(cfg))
    meta = EventMeta(id="child-1", eventId="child-1", correlationId="corr", parentEventId="parent",
                     eventType="file_discovered", producer="mod",
                     files=[BlobFile(path="a/b.txt", key="parent/mod/a/b.txt", size=3)],
                     data=[KeyValuePair(key="k", value="v")])
    store.upsert_event_metas([meta])
    store.upsert_insight(Insight(id="exec-1", executionId="exec-1", eventId="parent", correlationId="corr",
                                 parentEventId="", name="mod", data=[KeyValuePair(key="n", value="1")]))
    store.close()
    with mongo_server.client() as client:
        db = client["ion"]
        stored = db[cfg.collection].find_one({"id": "child-1"})
        assert stored == {"_id": "child-1", **meta.model_dump(mode="json")}
        assert {"id", "eventId", "correlationId", "parentEventId", "files", "data"} <= set(stored)
        assert stored["files"][0]["path"] == "a/b.txt" and stored["data"] == [{"key": "k", "value": "v"}]
        insight = db[cfg.collection + "_insights"].find_one({"_id": "exec-1"})
        assert insight["id"] == "exec-1" and insight["data"] == [{"key": "n", "value": "1"}]


def test_invalid_stored_document_raises_not_none(mongo_server) -> None:
    cfg = mongo_server.config(collection_name("bad"))
    with mongo_server.client() as client:
        client["ion"][cfg.collection].insert_one({"_id": "evt-broken", "id": "evt-broken", "eventId": 7})
    with Blocking(MongoDocumentStore(cfg)) as store, pytest.raises(DataPlaneError) as raised:
        store.get_event_meta("evt-broken")
    assert raised.value.status_code == 502 and "event meta 'evt-broken'" in raised.value.message
    assert "not a valid record" in raised.value.message


def test_refused_request_is_permanent(mongo_server) -> None:
    cfg = mongo_server.config("bad$name")  # MongoDB forbids '$' in collection names
    with Blocking(MongoDocumentStore(cfg)) as store, pytest.raises(DataPlaneError, match="event meta 'evt-1'") as raised:
        store.get_event_meta("evt-1")
    assert raised.value.status_code == 502


def test_retryable_server_errors() -> None:
    assert retryable(OperationFailure("Request rate is large", code=16500))  # Cosmos throttling
    assert retryable(OperationFailure("not primary", code=10107))
    assert not retryable(OperationFailure("Authentication failed.", code=18))
    assert not retryable(OperationFailure("no code"))
    race = {"writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}], "writeConcernErrors": []}
    assert retryable(BulkWriteError(race))
    mixed = {"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 2}], "writeConcernErrors": []}
    assert not retryable(BulkWriteError(mixed))
    labelled = OperationFailure("try again", code=9999, details={"errorLabels": ["RetryableWriteError"]})
    assert retryable(labelled)
