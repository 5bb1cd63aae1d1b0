"""Slow peers: a data-plane service that answers, but drips its bytes (each gap shorter than any read
timeout) or stalls after N bytes, must not hold ``/ready`` or ``/done`` without bound.

Each real provider on its local peer (Azurite, nx-27017, the AMQP 1.0 peer: ``tests/production``'s
stack), each behind the fault proxy's ``drip`` (``testsupport/faults.py``), with the session's Prefect
server and the sidecar's app in this process. Per kind of request, in one run: the call answers 503
naming the service within its deadline plus a slack, the proxy really saw that request and slowed its
answer, and once the fault is lifted the next call commits everything exactly once (every blob, the
insight, each event meta and each message). The drips send a byte every ``GAP`` seconds, under the
read timeouts set here, so before the total deadlines (``azureblobprovider.minbytespersecond``,
pymongo's ``timeoutMS``) the blob requests hung for as long as the peer kept dripping.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

from fastapi.testclient import TestClient

from flows.runtime import Runtime, blob_key, child_event_id
from sidecar.api import create_app
from sidecar.cli import compose_config
from testsupport.faults import FaultProxy
from testsupport.processes import SECRET
from testsupport.stack import Stack, seed_args

H = {"secret": SECRET}
GAP = 0.3  # seconds between two dripped bytes: under every read timeout below
CHUNK = 64 * 1024  # bytes per block or range, so BIG is four Put Blocks and four ranges
SPEED = 1024 * 1024  # --azureblobprovider.minbytespersecond
BLOB_FLOOR = 2.0  # --azureblobprovider.connecttimeoutseconds + .readtimeoutseconds, seconds
DOCS_DEADLINE = 2.0  # --mongodbdocprovider.sockettimeoutseconds (pymongo timeoutMS), seconds
BUS_DEADLINE = 3.0  # --servicebuseventprovider.publishtimeoutseconds, seconds
# What a call may take past its deadline: the flow and task runs' reports to the Prefect API (1.7 to
# 2.8 s at a load of 17 on 2 cores: tests/restart/test_timeouts.py) and tearing the connection down.
SLACK = 10.0
# bytes: one Put Blob; one Put Blob streamed from the file (above a chunk, at most SINGLE_PUT); four Put
# Blocks and a Put Block List
SMALL, STREAMED, BIG = 3000, 2 * CHUNK - 500, 4 * CHUNK - 1000
SINGLE_PUT = 2 * CHUNK  # --azureblobprovider.maxsingleputbytes


def runtime_for(stack: Stack, root: Path, event_id: str, name: str, parent: str = "") -> Runtime:
    """An in-process sidecar on ``stack`` with small deadlines and one task retry."""
    cfg, _ = compose_config(seed_args(stack, event_id, "corr-slow", name, parent) + [
        f"--sharedsecret={SECRET}", f"--basedir={root / name}", f"--devdir={root / '.dev'}",
        "--transfer.retries=1", "--transfer.retrydelayseconds=0.1",
        f"--azureblobprovider.chunkbytes={CHUNK}", f"--azureblobprovider.maxsingleputbytes={SINGLE_PUT}",
        "--azureblobprovider.connecttimeoutseconds=1",
        "--azureblobprovider.readtimeoutseconds=1", f"--azureblobprovider.minbytespersecond={SPEED}",
        "--mongodbdocprovider.serverselectiontimeoutseconds=1", f"--mongodbdocprovider.sockettimeoutseconds={DOCS_DEADLINE}",
        f"--servicebuseventprovider.publishtimeoutseconds={BUS_DEADLINE}",
    ])
    return Runtime.for_config(cfg)


def write_outputs(basedir: Path, label: str) -> None:
    """Three files (one Put Blob, one streamed Put Blob, one block list), one event naming them, an insight."""
    from ion_sidecar_client import SidecarClient

    client = SidecarClient(url="http://unused", secret="unused", basedir=basedir)
    client.write_file("put-blob.bin", (label.encode() * SMALL)[:SMALL])
    client.write_file("streamed.bin", (label.encode() * STREAMED)[:STREAMED])
    client.write_file("blocks.bin", (label.encode() * BIG)[:BIG])
    client.write_event("found", "file_discovered", ["put-blob.bin", "streamed.bin", "blocks.bin"], label=label)
    client.write_insight(label=label)


def slow_call(client: TestClient, path: str, proxy: FaultProxy, service: str, deadline: float, fault: str,
              figures: list[str]) -> None:
    """Call ``path`` under the proxy's armed drip: a 503 naming ``service`` within ``deadline`` + SLACK,
    after the proxy slowed an answer; then lift the fault."""
    before = (proxy.drips, proxy.dripped, proxy.stalled)
    started = time.monotonic()
    answer = client.get(path, headers=H)
    seconds = time.monotonic() - started
    proxy.up()
    figures.append(f"{path} {fault}: {answer.status_code} after {seconds:.1f} s (deadline {deadline:.1f} s)")
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["statusCode"] == 503 and service in body["message"], body
    assert proxy.drips > before[0], f"{fault}: the proxy never saw the request"
    assert proxy.dripped > before[1] or proxy.stalled > before[2], f"{fault}: the answer was not slowed"
    assert seconds <= deadline + SLACK, f"{fault}: {seconds:.1f} s"


def committed(stack: Stack, event_id: str, child_ids: list[str]) -> tuple[dict[str, bytes], collections.Counter,
                                                                          list[dict], collections.Counter]:
    """(blobs under the run's prefix, event metas per child id, the run's insights, messages per id)."""
    blobs = stack.blobs(f"{event_id}/")
    metas = collections.Counter(m["_id"] for m in stack.documents() if m.get("parentEventId") == event_id)
    insights = [d for d in stack.documents("_insights") if d.get("eventId") == event_id]
    delivered = collections.Counter(m.message_id for m in stack.received() if m.message_id in child_ids)
    return blobs, metas, insights, delivered


def test_slow_peers_get_503_within_deadlines_and_retry_commits_once(tmp_path: Path, stack: Stack) -> None:
    event_id = "slow-parent"
    runtime = runtime_for(stack, tmp_path, event_id, "mod")
    blob_deadline = BLOB_FLOOR + BIG / SPEED  # the largest request of these faults
    # (proxy, service, deadline, fault, drip arguments): one /done each, the fault lifted after it.
    faults = [
        (stack.blob_proxy, "blob store", blob_deadline, "Put Blob: the answer's headers trickle",
         dict(when=rb"PUT /[^ ?]*/put-blob\.bin HTTP", after=20, interval=GAP)),
        (stack.blob_proxy, "blob store", blob_deadline, "Put Blob streamed from the file: the answer's headers trickle",
         dict(when=rb"PUT /[^ ?]*/streamed\.bin HTTP", after=20, interval=GAP)),
        (stack.blob_proxy, "blob store", blob_deadline, "Put Block: the answer's headers trickle",
         dict(when=rb"comp=block&", after=20, interval=GAP)),
        (stack.blob_proxy, "blob store", blob_deadline, "Put Block List: the headers trickle after the status line",
         dict(when=rb"comp=blocklist", after=17, interval=GAP)),
        (stack.blob_proxy, "blob store", blob_deadline, "Get Blob Properties: the headers trickle",
         dict(when=rb"HEAD /", after=0, interval=GAP)),
        (stack.docs_proxy, "document store", DOCS_DEADLINE, "insight upsert: the reply trickles",
         dict(when=rb"_insights", after=0, interval=GAP)),
        (stack.docs_proxy, "document store", DOCS_DEADLINE, "event meta upsert: a stall after 20 bytes",
         dict(when=rb"update\x00.{4}" + re.escape(stack.collection.encode()) + rb"\x00", after=20, interval=None)),
        (stack.bus_proxy, "event bus", BUS_DEADLINE, "publish: no disposition after the transfer",
         # An AMQP 1.0 transfer performative, then the message's event type (the $cbs put-token is a transfer too).
         dict(when=rb"\x00\x53\x14.*file_discovered", after=0, interval=None)),
        (stack.bus_proxy, "event bus", BUS_DEADLINE, "publish: the connection's frames trickle",
         dict(when=b"", after=8, interval=GAP)),
    ]
    figures: list[str] = []
    duplicates_before = stack.peer.topics[stack.topic].duplicates
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_outputs(runtime.layout.basedir, event_id)
        for proxy, service, deadline, fault, drip in faults:
            proxy.drip(**drip)
            slow_call(client, "/done", proxy, service, deadline, fault, figures)
        answer = client.get("/done", headers=H)
        assert answer.status_code == 200, answer.text
    print("\n" + "\n".join(figures))
    child_ids = [e["eventId"] for e in answer.json()["events"]]
    assert child_ids == [child_event_id(runtime.cfg, "found.json")]
    blobs, metas, insights, delivered = committed(stack, event_id, child_ids)
    assert blobs == {blob_key(runtime.cfg, "put-blob.bin"): (event_id.encode() * SMALL)[:SMALL],
                     blob_key(runtime.cfg, "streamed.bin"): (event_id.encode() * STREAMED)[:STREAMED],
                     blob_key(runtime.cfg, "blocks.bin"): (event_id.encode() * BIG)[:BIG]}
    assert metas == {child_ids[0]: 1} and len(insights) == 1
    assert delivered == {child_ids[0]: 1}, "each event delivered exactly once"
    # The message whose disposition never came had reached the bus: a retry re-published it under the
    # same message id and duplicate detection dropped it (the fault really hit the publish).
    assert stack.peer.topics[stack.topic].duplicates > duplicates_before

    # /ready of the child: its event meta (MongoDB) and both blobs' downloads (Azure), each slowed.
    child = runtime_for(stack, tmp_path, child_ids[0], "child", parent=event_id)
    faults = [
        (stack.docs_proxy, "document store", DOCS_DEADLINE, "event meta read: the reply trickles after its header",
         dict(when=rb"find", after=16, interval=GAP)),
        (stack.blob_proxy, "blob store", BLOB_FLOOR + CHUNK / SPEED, "Get Blob: the body trickles after 100 bytes",
         dict(when=rb"GET /[^ ?]*/put-blob\.bin", after=100, interval=GAP, past_head=True)),
        (stack.blob_proxy, "blob store", BLOB_FLOOR + CHUNK / SPEED, "Get Blob range: a stall after 1000 bytes",
         dict(when=rb"(?i)x-ms-range: bytes=131072-", after=1000, interval=None, past_head=True)),
    ]
    with TestClient(create_app(child)) as client:
        for proxy, service, deadline, fault, drip in faults:
            proxy.drip(**drip)
            slow_call(client, "/ready", proxy, service, deadline, fault, figures)
            assert not list(child.layout.in_data.rglob("*.partial")), "no partial download is left in in/data"
        answer = client.get("/ready", headers=H)
        assert answer.status_code == 200, answer.text
    print("\n".join(figures[-len(faults):]))
    staged = {p.name: p.read_bytes() for p in child.layout.in_data.rglob("*") if p.is_file()}
    assert staged == {name: blobs[blob_key(runtime.cfg, name)] for name in ("put-blob.bin", "streamed.bin", "blocks.bin")}


def test_trickled_handshake_is_503_within_the_deadline_then_ready(tmp_path: Path, stack: Stack) -> None:
    """A document store that trickles its connection handshake (the ``hello`` reply, which carries pymongo's
    speculative authentication) a byte every 0.3 s: each gap is under every read timeout, so only the
    call's total deadline can end it. A sidecar whose client connects for the first time inside /ready
    answers 503 naming the document store within its deadline, and /ready succeeds once the fault is lifted.
    (The test above covers replies to commands on connections already open.)"""
    runtime = runtime_for(stack, tmp_path, "handshake-drip", "mod")
    proxy = stack.docs_proxy
    with TestClient(create_app(runtime)) as client:
        proxy.drip(when=rb"(?i)hello|ismaster", after=0, interval=GAP)
        before = proxy.drips
        started = time.monotonic()
        answer = client.get("/ready", headers=H)
        seconds = time.monotonic() - started
        proxy.up()
        assert proxy.drips > before and proxy.dripped > 0, "the handshake was never slowed"
        assert answer.status_code == 503 and "document store" in answer.json()["message"], answer.text
        assert seconds <= DOCS_DEADLINE + SLACK, seconds
        again = client.get("/ready", headers=H)
        assert again.status_code == 200, again.text
