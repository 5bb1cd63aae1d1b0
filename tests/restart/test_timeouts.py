"""Every timeout a user sets is the bound the module sees, end to end, task retries included
(``DESIGN.md``: The sidecar's lifecycle, Time). Per service, a peer that accepts TCP connections and
never answers: the time from the call to its 503 stays within the configured bound plus a small slack,
with the default three task retries in force (before: (retries + 1) x the bound, plus back-off)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from testsupport.amqp_peer import emulator_connection_string
from testsupport.azurite import ACCOUNT, ACCOUNT_KEY
from testsupport.runtime import H, dev_runtime
from testsupport.servicebus import SilentListener

# The configured bound of each test, and what a flow run may add around the I/O: creating and reporting
# the flow and task runs to the Prefect API (1.7 to 2.8 s measured at a load average of 17 on 2 cores,
# more at 27), seconds. One more attempt would add the bound again plus 1 s of back-off: more than the
# slack, so the test still tells a bound from a multiple of it.
BOUND = 8.0
SLACK = 8.0


@pytest.fixture
def silent() -> SilentListener:
    listener = SilentListener()
    yield listener
    listener.close()


def wait_healthy(client: TestClient) -> None:
    deadline = time.monotonic() + 120
    while client.get("/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the Prefect API never became usable"
        time.sleep(0.05)


def timed(client: TestClient, path: str) -> tuple[float, dict, int]:
    started = time.monotonic()
    answer = client.get(path, headers=H)
    return time.monotonic() - started, answer.json(), answer.status_code


def write_outputs(runtime) -> None:
    lay = runtime.layout
    for i in range(3):
        (lay.out_data / f"f{i}.bin").write_bytes(b"z" * 2048)
    (lay.out_events / "e.json").write_text('[{"key": "eventType", "value": "found"}, {"key": "files", "value": "f0.bin"}]')


def test_blob_store_that_never_answers_is_503_within_its_read_timeout(tmp_path: Path, silent: SilentListener) -> None:
    blob = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{silent.port}/{ACCOUNT};")
    runtime = dev_runtime(tmp_path, "--transfer.retries=3", "--development=false", "--azureblobprovider=true",
                           "--azureblobprovider.containername=timeouts", f"--azureblobprovider.connectionstring={blob}",
                           "--azureblobprovider.connecttimeoutseconds=2", f"--azureblobprovider.readtimeoutseconds={BOUND}")
    with TestClient(create_app(runtime)) as client:
        wait_healthy(client)
        assert client.get("/ready", headers=H).status_code == 200  # the first module: no blob to read
        write_outputs(runtime)
        seconds, body, status = timed(client, "/done")
    print(f"\nblob store never answering: 503 after {seconds:.1f} s (read timeout {BOUND} s)")
    assert status == 503 and "blob store" in body["message"], body
    assert silent.accepted >= 1  # the fault: the peer took the connection and said nothing
    assert BOUND <= seconds <= BOUND + SLACK


def test_document_store_that_never_answers_is_503_within_its_selection_timeout(tmp_path: Path,
                                                                             silent: SilentListener) -> None:
    runtime = dev_runtime(tmp_path, "--transfer.retries=3", "--development=false", "--mongodbdocprovider=true",
                           f"--mongodbdocprovider.uri=mongodb://127.0.0.1:{silent.port}/?directConnection=true",
                           f"--mongodbdocprovider.serverselectiontimeoutseconds={BOUND}",
                           f"--mongodbdocprovider.connecttimeoutseconds={BOUND}",
                           f"--mongodbdocprovider.sockettimeoutseconds={BOUND}")
    with TestClient(create_app(runtime)) as client:
        wait_healthy(client)
        seconds, body, status = timed(client, "/ready")
    print(f"\ndocument store never answering: 503 after {seconds:.1f} s (selection timeout {BOUND} s)")
    assert status == 503 and "document store" in body["message"], body
    assert silent.accepted >= 1
    assert BOUND <= seconds <= BOUND + SLACK


def test_event_bus_that_never_answers_is_503_within_the_publish_deadline(tmp_path: Path,
                                                                        silent: SilentListener) -> None:
    runtime = dev_runtime(tmp_path, "--transfer.retries=3", "--development=false", "--servicebuseventprovider=true",
                           "--servicebuseventprovider.topic=events",
                           f"--servicebuseventprovider.connectionstring={emulator_connection_string(silent.port)}",
                           f"--servicebuseventprovider.publishtimeoutseconds={BOUND}")
    with TestClient(create_app(runtime)) as client:
        wait_healthy(client)
        assert client.get("/ready", headers=H).status_code == 200
        write_outputs(runtime)
        seconds, body, status = timed(client, "/done")
    print(f"\nevent bus never answering: 503 after {seconds:.1f} s (publish deadline {BOUND} s)")
    assert status == 503 and "event bus" in body["message"] and "within" in body["message"], body
    assert silent.accepted >= 1
    assert BOUND <= seconds <= BOUND + SLACK
