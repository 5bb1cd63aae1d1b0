"""The sidecar process under stress: SIGTERM during a call, and file-descriptor exhaustion
(``sidecar/serving.py``). Real processes in development mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil

from ion_sidecar_client import SidecarClient
from testsupport.processes import SECRET, RestartableSidecar, dev_args


def done_in_background(sidecar: RestartableSidecar) -> Callable[[], httpx.Response]:
    """Call ``/done`` on a thread; the returned function waits for its answer (60 s at most)."""
    answers: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answers.append(
        httpx.get(f"{sidecar.url}/done", headers={"secret": SECRET}, timeout=120)), daemon=True)
    call.start()

    def answer() -> httpx.Response:
        call.join(60)
        [response] = answers
        return response

    return answer


def assert_stopped_with_503(sidecar: RestartableSidecar, answer: Callable[[], httpx.Response]) -> None:
    """The in-flight call was answered 503 with the JSON body, and the process exited 0."""
    response = answer()
    assert sidecar.proc.wait(60) == 0, sidecar.output()
    assert response.status_code == 503, response.text
    assert response.json()["statusCode"] == 503 and "SIGTERM" in response.json()["message"]


def test_sigterm_answers_the_inflight_call_503_json_exits_0_and_the_successor_resumes(tmp_path: Path,
                                                                                       sidecars: list) -> None:
    sidecar = RestartableSidecar(tmp_path, dev_args("term-evt", "term-corr", "mod") + [f"--devdir={tmp_path / '.dev'}"])
    sidecars.append(sidecar)
    sidecar.start(pause_at="uploaded")
    client = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
    client.ready(retry_seconds=900)
    for i in range(3):
        client.write_file(f"f{i}.txt", b"x" * 100)
        client.write_event(f"e{i}", "file_discovered", [f"f{i}.txt"])
    answer = done_in_background(sidecar)
    sidecar.wait_paused()  # /done is in flight, frozen after its uploads
    os.kill(sidecar.proc.pid, signal.SIGTERM)  # as a liveness probe's restart or a node drain does
    os.kill(sidecar.proc.pid, signal.SIGCONT)
    assert_stopped_with_503(sidecar, answer)
    record = json.loads((sidecar.basedir / ".sidecar" / "run.json").read_text())
    assert record["phase"] == "ready" and not record["closed"] and record["published"] == []
    assert not (tmp_path / ".dev" / "events").exists()  # cancelled before the publish

    sidecar.start()  # the same flags: the module's retry resumes the run
    done = client.done(retry_seconds=900)
    assert done["files"] == 3 and len(done["events"]) == 3
    assert len(list((tmp_path / ".dev" / "events").glob("*.json"))) == 3
    assert sidecar.stop() == 0


def test_descriptor_exhaustion_closes_idle_connections_and_logs_once(tmp_path: Path, sidecars: list) -> None:
    nofile, idle = 160, 240  # more idle connections than the process has descriptors
    sidecar = RestartableSidecar(tmp_path, dev_args("fd-evt", "fd-corr", "mod") + [f"--devdir={tmp_path / '.dev'}"])
    sidecars.append(sidecar)
    sidecar.start(nofile=nofile)
    sidecar.wait_healthy()
    process = psutil.Process(sidecar.proc.pid)
    assert process.rlimit(psutil.RLIMIT_NOFILE) == (nofile, nofile)
    log_before = sidecar.log.stat().st_size

    sockets = []
    started = time.monotonic()
    for _ in range(idle):  # connect and never send a byte
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", sidecar.port))
        sockets.append(sock)
    cpu_before = sum(process.cpu_times()[:2])
    time.sleep(2)
    assert process.num_fds() >= nofile - 5, "the fault: the sidecar's descriptors are used up"

    # /healthz is answered (or refused fast) once idle connections are closed: within the idle timeout.
    answer = httpx.get(f"{sidecar.url}/healthz", timeout=30)
    waited = time.monotonic() - started
    assert answer.status_code in (200, 503), answer.text
    assert waited < 20, f"/healthz answered only after {waited:.1f} s"
    cpu = (sum(process.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started - 0)
    # Connections that never sent a byte were closed by the sidecar (the client reads EOF).
    closed = 0
    for sock in sockets:
        sock.setblocking(True)
        sock.settimeout(15)
        try:
            if sock.recv(1) == b"":
                closed += 1
        except (ConnectionResetError, TimeoutError, OSError):
            pass
        sock.close()
    text = sidecar.output()
    grew = sidecar.log.stat().st_size - log_before
    print(f"\nfd exhaustion: /healthz {answer.status_code} after {waited:.1f} s, {closed}/{idle} idle connections "
          f"closed by the sidecar, CPU {cpu:.0%}, log grew {grew} bytes")
    assert closed == idle
    assert text.count("cannot accept connections") == 1, text[-3000:]  # happened, and logged once
    assert grew < 20_000
    assert cpu < 0.5
    # Served by the app again (its JSON body, not uvicorn's plain-text overload answer). 200 needs the
    # Prefect API probe to have survived the exhaustion too (sidecar/orchestration.py).
    again = httpx.get(f"{sidecar.url}/healthz", timeout=10)
    assert again.status_code in (200, 503) and "status" in again.json(), again.text
    assert sidecar.stop() == 0


def test_sigterm_while_the_call_waits_on_a_silent_blob_store_is_503_json_and_exit_0(tmp_path: Path,
                                                                                    sidecars: list) -> None:
    # The event loop is idle in select() when the signal lands (the upload waits on a peer that never
    # answers): Prefect's own SIGTERM bridge, if installed for the flow run, raised TerminationSignal
    # there, and the module got a plain-text 500 and the process exit code 1 (hostile trial).
    from testsupport.azurite import ACCOUNT, ACCOUNT_KEY
    from testsupport.servicebus import SilentListener

    silent = SilentListener()
    try:
        endpoint = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                    f"BlobEndpoint=http://127.0.0.1:{silent.port}/{ACCOUNT};")
        sidecar = RestartableSidecar(tmp_path, ["--context.eventid=term-io", "--context.correlationid=term-corr",
                                     "--context.name=mod", "--valideventtypes=file_discovered",
                                     f"--devdir={tmp_path / '.dev'}", "--azureblobprovider=true",
                                     f"--azureblobprovider.connectionstring={endpoint}",
                                     "--azureblobprovider.containername=silent", "--azureblobprovider.readtimeoutseconds=120"])
        sidecars.append(sidecar)
        sidecar.start()
        client = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
        client.ready(retry_seconds=900)
        client.write_file("f.txt", b"x" * 100)
        answer = done_in_background(sidecar)
        deadline = time.monotonic() + 120
        while not silent.accepted and time.monotonic() < deadline:  # the upload is waiting on the peer
            time.sleep(0.1)
        assert silent.accepted, f"the upload never reached the blob store:\n{sidecar.output()}"
        time.sleep(1)
        os.kill(sidecar.proc.pid, signal.SIGTERM)
        assert_stopped_with_503(sidecar, answer)
    finally:
        silent.close()
