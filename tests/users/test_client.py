"""client/ (ion_sidecar_client), the module authors' client: the /ready retry loop against a sidecar
that starts after the module, no retry of 4xx answers (but a few of a 409 on /done), retries of
connection errors and 5xx for a total time, the secret's bytes on the wire, and the folder contract its
helpers write."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from ion_sidecar_client import COMMITTED_ALREADY, SidecarCallError, SidecarClient
from sidecar.layout import ModuleLayout, plan_outputs
from sidecar.models import KeyValuePair
from testsupport.processes import SECRET, SidecarProcess, dev_args, free_port


class RecordingClient(SidecarClient):
    """A SidecarClient that records the outcome of every request it sends (status or error name)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes: list[object] = []

    def _get(self, path: str, timeout: float) -> dict:
        try:
            body = super()._get(path, timeout)
        except SidecarCallError as exc:
            self.outcomes.append(exc.status_code)
            raise
        except httpx.TransportError as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        self.outcomes.append(200)
        return body


def test_ready_waits_for_a_sidecar_that_starts_after_the_module(tmp_path: Path) -> None:
    port = free_port()
    client = RecordingClient(url=f"http://127.0.0.1:{port}", secret=SECRET, basedir=tmp_path / "ion",
                             retry_seconds=120, first_delay=0.2, max_delay=0.2)
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(client.ready()), daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while len(client.outcomes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.outcomes[:2] == ["ConnectError", "ConnectError"]  # nothing listened yet
    # The sidecar starts now, on the port the module already calls (the later --serverport wins).
    with SidecarProcess(tmp_path, dev_args("evt-late", "corr-late", "late") + [f"--serverport={port}"]) as sidecar:
        caller.join(120)
        assert not caller.is_alive(), sidecar.output()
        assert result["flowRunId"] and result["files"] == 0
        assert client.outcomes[-1] == 200 and len(client.outcomes) > 2
        assert client.input_meta() == {}  # in/meta.json was staged
        assert client.done()["events"] == []


def test_4xx_answers_are_not_retried_but_a_409_on_done_is_a_few_times(idle_sidecar: SidecarProcess) -> None:
    wrong = RecordingClient(url=idle_sidecar.url, secret="not-the-secret", basedir=idle_sidecar.basedir,
                            retry_seconds=30, first_delay=0.01)
    with pytest.raises(SidecarCallError) as refused:
        wrong.ready()
    assert refused.value.status_code == 401 and wrong.outcomes == [401]
    assert json.loads(refused.value.body)["statusCode"] == 401

    # /done before /ready is 409; a restarted sidecar that has not resumed its run yet answers the same,
    # so the client retries it conflict_retries times before it gives up.
    early = RecordingClient(url=idle_sidecar.url, secret=SECRET, basedir=idle_sidecar.basedir,
                            retry_seconds=30, first_delay=0.01, conflict_retries=2)
    with pytest.raises(SidecarCallError) as out_of_order:
        early.done()
    assert out_of_order.value.status_code == 409 and early.outcomes == [409, 409, 409]


SECRETS_SEEN: list[bytes] = []


@pytest.fixture
def scripted_server() -> Iterator[tuple[str, list[int]]]:
    """A loopback HTTP server answering each GET with the next status of the list (then 200)."""
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            # http.server decodes header bytes as latin-1; keep the raw bytes for the tests to see.
            SECRETS_SEEN.append(self.headers.get("secret", "").encode("latin-1"))
            status, message = statuses.pop(0) if statuses else 200, "scripted"
            if isinstance(status, tuple):  # (status, message)
                status, message = status
            body = json.dumps({"statusCode": status, "message": message} if status != 200 else {"ok": True}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", statuses
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_answers_are_retried_for_the_total_time_then_raised(scripted_server: tuple[str, list[int]],
                                                                 tmp_path: Path) -> None:
    url, statuses = scripted_server
    client = RecordingClient(url=url, secret=SECRET, basedir=tmp_path, retry_seconds=30, first_delay=0)
    statuses.extend([503, 502, 500])
    assert client.done() == {"ok": True}
    assert client.outcomes == [503, 502, 500, 200]

    client = RecordingClient(url=url, secret=SECRET, basedir=tmp_path, retry_seconds=30, first_delay=0.1,
                             max_delay=0.4)
    statuses.extend([503] * 1000)
    started = time.monotonic()
    with pytest.raises(SidecarCallError) as exhausted:
        client.ready(retry_seconds=1.5)  # back-off 0.1, 0.2, 0.4, 0.4, ... until 1.5 s have passed
    elapsed = time.monotonic() - started
    statuses.clear()
    assert exhausted.value.status_code == 503 and set(client.outcomes) == {503}
    assert 1.5 <= elapsed < 10 and len(client.outcomes) >= 4


def test_a_409_naming_outputs_written_after_the_commit_is_not_retried(scripted_server: tuple[str, list],
                                                                       tmp_path: Path) -> None:
    """The 409 of a repeated /done whose run committed already (out/ changed since) raises at once: no
    retry can commit what it names. Other 409s on /done are still retried (a resuming sidecar)."""
    url, statuses = scripted_server
    client = RecordingClient(url=url, secret=SECRET, basedir=tmp_path, retry_seconds=30, first_delay=0)
    statuses.extend([(409, f"{COMMITTED_ALREADY} (flow run x); not committed: out/data/late.txt: written after")])
    with pytest.raises(SidecarCallError) as refused:
        client.done()
    assert refused.value.status_code == 409 and client.outcomes == [409] and "late.txt" in refused.value.body
    statuses.extend([(409, "/done before /ready: call /ready first")])
    assert client.done() == {"ok": True} and client.outcomes == [409, 409, 200]


def test_connection_errors_are_retried_for_the_total_time_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_RETRY_SECONDS", "1.2")
    client = RecordingClient(url=f"http://127.0.0.1:{free_port()}", secret=SECRET, basedir=tmp_path,
                             first_delay=0.1, max_delay=0.3)
    assert client.retry_seconds == 1.2
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        client.done()
    elapsed = time.monotonic() - started
    assert 1.2 <= elapsed < 10 and set(client.outcomes) == {"ConnectError"} and len(client.outcomes) >= 4
    monkeypatch.setenv("SIDECAR_RETRY_SECONDS", "soon")
    with pytest.raises(ValueError, match="SIDECAR_RETRY_SECONDS"):
        SidecarClient(secret=SECRET)


def test_the_secret_goes_on_the_wire_as_utf8(scripted_server: tuple[str, list[int]], tmp_path: Path) -> None:
    url, _ = scripted_server
    SECRETS_SEEN.clear()
    for secret in (SECRET, "s\u00e9cr\u00eat-\u2603-\U0001f511"):
        SidecarClient(url=url, secret=secret, basedir=tmp_path).ready()
    assert SECRETS_SEEN == [SECRET.encode(), "s\u00e9cr\u00eat-\u2603-\U0001f511".encode("utf-8")]


def test_helpers_write_what_the_sidecar_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARED_SECRET", SECRET)
    monkeypatch.setenv("SIDECAR_PORT", "9999")
    monkeypatch.setenv("SIDECAR_BASEDIR", str(tmp_path))
    client = SidecarClient()
    assert client.url == "http://127.0.0.1:9999" and client.secret == SECRET and client.layout.basedir == tmp_path

    layout = ModuleLayout(tmp_path)
    layout.write_input_meta([KeyValuePair(key="index", value="2")])
    assert client.input_meta() == {"index": "2"}
    (layout.in_data / "items").mkdir(parents=True)
    (layout.in_data / "items" / "item2.txt").write_bytes(b"two")
    assert client.input_files() == ["items/item2.txt"]  # relative to in/data, not openable as they are
    assert [client.input_path(p).read_bytes() for p in client.input_files()] == [b"two"]
    for bad in ("/etc/passwd", "../in/data/items/item2.txt"):
        with pytest.raises(ValueError, match="relative to in/data"):
            client.input_path(bad)
    client.write_file("a/b.txt", b"hello")
    client.write_event("first", "file_discovered", ["a/b.txt"], sha1="x")
    client.write_event("second", "file_discovered")
    client.write_insight(files="1")
    plan = plan_outputs(layout, ["file_discovered"], 256 * 1024)  # the sidecar's own /done validation
    assert [f.path for f in plan.files] == ["a/b.txt"] and plan.bytes == 5
    assert [(e.file, e.files, [p.key for p in e.data]) for e in plan.events] == [
        ("first.json", ["a/b.txt"], ["sha1"]), ("second.json", [], [])]
    assert [(p.key, p.value) for p in plan.insight] == [("files", "1")]


def test_client_without_a_shared_secret_says_so(monkeypatch) -> None:
    monkeypatch.delenv("SHARED_SECRET", raising=False)
    with pytest.raises(ValueError, match="set SHARED_SECRET"):
        SidecarClient(url="http://127.0.0.1:1")
