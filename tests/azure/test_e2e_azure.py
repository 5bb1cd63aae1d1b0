"""End to end with the Azure provider: two real sidecar processes chained parent -> child through
Azurite, each with a real module process (examples/module.py), as tests/test_e2e_dev.py does through
``.dev/``. Documents and events stay on the development providers (a valid set-up, DESIGN.md)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
from azure.storage.blob.aio import BlobServiceClient

from sidecar.providers.jsonfiles import JsonFileDocumentStore
from sidecar.models import BlobFile, EventMeta
from testsupport.azurite import ACCOUNT, Azurite, sidecar_args
from testsupport.processes import SidecarProcess, free_port, run_module

CONTAINER = "ion-e2e"


async def blob_names(azurite: Azurite) -> list[str]:
    async with BlobServiceClient.from_connection_string(azurite.connection_string()) as service:
        return sorted([b.name async for b in service.get_container_client(CONTAINER).list_blobs()])


def test_parent_then_child_chain_through_azurite(azurite: Azurite, tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, sidecar_args(azurite, CONTAINER, "evt-az-root", "corr-az", "parent")) as parent:
        done = run_module(parent, EVENT_LABEL="root")[-1]["done"]
    assert done["files"] == 5 and len(done["events"]) == 5
    assert asyncio.run(blob_names(azurite)) == [f"evt-az-root/parent/found/file{i}.txt" for i in range(5)]
    assert not (tmp_path / ".dev" / "blobs").exists(), "no blob went to the development store"

    documents = JsonFileDocumentStore(tmp_path / ".dev" / "documents")
    metas = [asyncio.run(documents.get_event_meta(e["eventId"])) for e in done["events"]]
    meta = next(m for m in metas if m and m.files[0].path == "found/file2.txt")
    parent_file = tmp_path / "ion" / "out" / "data" / "found" / "file2.txt"
    recorded = meta.files[0]
    assert recorded.key == "evt-az-root/parent/found/file2.txt" and recorded.size == parent_file.stat().st_size
    assert recorded.md5 and recorded.url and recorded.url.startswith(f"{azurite.endpoint}/{CONTAINER}/")
    assert httpx.get(recorded.url).content == parent_file.read_bytes(), "the SAS URL serves the blob"

    # The child starts from its event as Ion's dispatcher would: the event id from the bus.
    event = json.loads((tmp_path / ".dev" / "events" / f"{meta.id}.json").read_text())
    (tmp_path / "ion").rename(tmp_path / "ion-parent")
    context = event["context"]
    child_args = sidecar_args(azurite, CONTAINER, context["eventId"], context["correlationId"], "child",
                              parent=context["parentEventId"])
    with SidecarProcess(tmp_path, child_args) as child:
        staged = run_module(child, EVENT_LABEL="child", FILES="1")[0]
    assert staged["inputs"] == ["found/file2.txt"]
    assert (tmp_path / "ion" / "in" / "data" / "found" / "file2.txt").read_bytes() == \
        (tmp_path / "ion-parent" / "out" / "data" / "found" / "file2.txt").read_bytes()
    assert staged["meta"]["index"] == "2" and staged["ready"]["files"] == 1
    assert f"{event['context']['eventId']}/child/found/file0.txt" in asyncio.run(blob_names(azurite))


def test_blob_failures_answer_5xx_naming_the_blob(azurite: Azurite, tmp_path: Path) -> None:
    """Through the HTTP API: a wrong key on /done and a missing container on /ready are permanent (502),
    an unreachable endpoint is transient (503 once the task retries are spent)."""
    wrong_key = base64.b64encode(b"wrong key" * 7).decode()
    unreachable = azurite.connection_string().replace(azurite.endpoint, f"http://127.0.0.1:{free_port()}/{ACCOUNT}")
    setups = {
        "badkey": sidecar_args(azurite, CONTAINER, "evt-bad", "corr-bad", "parent")
        + [f"--azureblobprovider.connectionstring={azurite.connection_string(wrong_key)}"],
        "down": sidecar_args(azurite, CONTAINER, "evt-down", "corr-down", "parent")
        + [f"--azureblobprovider.connectionstring={unreachable}", "--transfer.retries=1",
           "--transfer.retrydelayseconds=0.1"],
        "nocontainer": sidecar_args(azurite, "no-such-container", "evt-child", "corr-child", "child"),
    }
    # The child's event meta, as a parent would have recorded it, pointing into a missing container.
    (tmp_path / "nocontainer").mkdir()
    documents = JsonFileDocumentStore(tmp_path / "nocontainer" / ".dev" / "documents")
    asyncio.run(documents.upsert_event_metas([EventMeta(
        id="evt-child", eventId="evt-child", correlationId="corr-child", parentEventId="evt-p", eventType="t",
        producer="p", files=[BlobFile(path="a/b.txt", key="evt-p/p/a/b.txt", size=1)])]))
    sidecars = {}
    for name, args in setups.items():
        (tmp_path / name).mkdir(exist_ok=True)
        sidecars[name] = SidecarProcess(tmp_path / name, args)
    try:
        for name in ("badkey", "down"):
            sidecar = sidecars[name]
            sidecar.wait_healthy()
            assert sidecar.get("/ready").status_code == 200
            (sidecar.basedir / "out" / "data" / "found").mkdir(parents=True)
            (sidecar.basedir / "out" / "data" / "found" / "x.txt").write_text("x")
        answers = {name: sidecars[name].get("/done") for name in ("badkey", "down")}
        sidecars["nocontainer"].wait_healthy()
        answers["nocontainer"] = sidecars["nocontainer"].get("/ready")
    finally:
        outputs = {name: sidecar.output() for name, sidecar in sidecars.items()}
        for sidecar in sidecars.values():
            sidecar.stop()
    expected = {"badkey": (502, "evt-bad/parent/found/x.txt"), "down": (503, "evt-down/parent/found/x.txt"),
                "nocontainer": (502, "evt-p/p/a/b.txt")}
    for name, (status, blob) in expected.items():
        body = answers[name].json()
        assert (answers[name].status_code, body["statusCode"]) == (status, status), (name, body, outputs[name])
        assert blob in body["message"], (name, body)
    assert "no-such-container" in answers["nocontainer"].json()["message"]
    assert "authentication failed" in answers["badkey"].json()["message"]
    assert all(wrong_key not in text and "AccountKey=" not in text for text in outputs.values()), "no secret logged"
