"""Security of a running sidecar (development providers, real processes).

- Every path but ``/healthz`` refuses a request without the right ``secret`` header: 401 with the
  contract's JSON body, before any routing (so unknown paths and wrong methods are 401 too), and the
  refused calls change nothing.
- ``--printconfig`` and every log line of a full parent run (stdout/stderr, ``--logfile`` and the logs
  the flow runs send to the Prefect API) are free of the shared secret and of every secret passed via
  provider flags. The provider secrets are distinctive fake values set without enabling the providers
  (``--development=true`` with a real provider enabled is refused by design), and one ``/done`` fails on
  purpose with a secret in its message, so the redaction itself is exercised on the sidecar's and on
  Prefect's own log records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from ion_sidecar_client import SidecarCallError, SidecarClient
from testsupport.processes import SECRET, SidecarProcess, dev_args

SHARED_SECRET = "Shared-Secret-5f3a9c71"
PROVIDER_SECRETS = {
    "azureblobprovider.blobaccountkey": "QXp1cmVLZXktOGQ0YjE5",
    "azureblobprovider.connectionstring": "DefaultEndpointsProtocol=http;AccountName=fakeacct;"
                                          "AccountKey=Q29ublN0cktleS0yZTdm;BlobEndpoint=http://127.0.0.1:9/fakeacct;",
    "mongodbdocprovider.password": "MongoPw-b81c55e2",
    "mongodbdocprovider.uri": "mongodb://root:MongoUriPw-3d9e07@127.0.0.1:9/?authSource=admin",
    "servicebuseventprovider.key": "SbKey-a4f0e2d8",
    "servicebuseventprovider.connectionstring": "Endpoint=sb://127.0.0.1;SharedAccessKeyName=Root;"
                                                "SharedAccessKey=SbConnKey-61b7c3;UseDevelopmentEmulator=true;",
}
# Whole values, and the key parts inside the URI and connection strings (a provider could log a part).
FORBIDDEN = [SHARED_SECRET, *PROVIDER_SECRETS.values(),
             "Q29ublN0cktleS0yZTdm", "MongoUriPw-3d9e07", "SbConnKey-61b7c3"]
EVENT_ID = "evt-security-1"


def test_every_path_but_healthz_needs_the_secret(idle_sidecar: SidecarProcess) -> None:
    paths = ["/ready", "/done", "/", "/openapi.json", "/docs", "/no/such/path", "/ready/", "/healthz/", "/HEALTHZ",
             "/ready?secret=" + SECRET]
    refused_headers = [{}, {"secret": ""}, {"secret": "wrong"}, {"secret": SECRET + "x"}, {"secret": SECRET[:-1]},
                       {"secret": SECRET.upper()}, {"authorization": SECRET}, {"x-secret": SECRET}]
    with httpx.Client(base_url=idle_sidecar.url, timeout=30) as http:
        for method in ("GET", "POST", "PUT", "DELETE"):
            for path in paths:
                for headers in refused_headers:
                    response = http.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, headers, response.text)
                    body = response.json()
                    assert body["statusCode"] == 401 and body["message"], body
                    assert SECRET not in response.text
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "phase": "new"}
        # The right secret passes the check: an unknown path is then a 404 with the same JSON shape.
        unknown = http.get("/no/such/path", headers={"secret": SECRET})
        assert unknown.status_code == 404 and unknown.json()["statusCode"] == 404
    # Nothing was staged by the refused calls.
    assert not (idle_sidecar.basedir / "in" / "meta.json").exists()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A parent run with every secret set: ready, one /done refused, the retried /done committed.

    Yields ``{"cwd", "output", "logfile", "failed", "ready", "done"}`` once the sidecar has stopped.
    """
    cwd = tmp_path_factory.mktemp("security-run")
    logfile = cwd / "sidecar.log"
    args = dev_args(EVENT_ID, "corr-security-1", "secure") + [
        "--printconfig", "--loglevel=debug", f"--logfile={logfile}",
        *(f"--{key}={value}" for key, value in PROVIDER_SECRETS.items()),
    ]
    with SidecarProcess(cwd, args, secret=SHARED_SECRET) as sidecar:
        client = SidecarClient(url=sidecar.url, secret=SHARED_SECRET, basedir=sidecar.basedir)
        ready = client.ready(retry_seconds=60)
        client.write_file("report.txt", b"what the module found\n")
        client.write_event("found", "file_discovered", ["report.txt"], note="ok")
        client.write_insight(checked="1")
        # An event type that happens to equal a secret: the 400's message, the sidecar's warning and
        # Prefect's own flow-run failure lines all carry it, so each must be redacted.
        probe = client.write_event("probe", PROVIDER_SECRETS["mongodbdocprovider.password"])
        with pytest.raises(SidecarCallError) as failed:
            client.done(retry_seconds=0)
        probe.unlink()
        done = client.done(retry_seconds=5)
    yield {"cwd": cwd, "output": sidecar.log.read_text(errors="replace"), "logfile": logfile, "failed": failed.value,
           "ready": ready, "done": done}


def test_full_run_commits_after_the_refused_done(full_run: dict) -> None:
    assert full_run["failed"].status_code == 400
    assert "out/events/probe.json" in full_run["failed"].body
    done = full_run["done"]
    assert done["files"] == 1 and [e["eventType"] for e in done["events"]] == ["file_discovered"]


def test_printconfig_shows_no_secret(full_run: dict) -> None:
    output = full_run["output"]
    printed = output[output.index("context:"):]
    for key in ["sharedsecret", *PROVIDER_SECRETS]:
        leaf = key.split(".")[-1]
        assert f"{leaf}: '***'" in printed or f"{leaf}: ***" in printed, f"{key} not redacted in --printconfig"
    for secret in FORBIDDEN:
        assert secret not in output


def test_no_log_line_carries_a_secret(full_run: dict) -> None:
    logfile_text = full_run["logfile"].read_text(encoding="utf-8")
    output = full_run["output"]
    # Not vacuous: both hold the run's lines, including the refused /done's, redacted.
    for text in (logfile_text, output):
        assert "done: committed 1 files" in text
        assert "out/events/probe.json" in text and "event type '***'" in text
    leaks = [(name, secret) for name, text in (("logfile", logfile_text), ("stdout/stderr", output))
             for secret in FORBIDDEN if secret in text]
    assert not leaks, f"secrets in the logs: {leaks}"
    # Whatever else the run left on disk outside the module's own folders (.dev dumps, logs).
    for path in Path(full_run["cwd"]).rglob("*"):
        if path.is_file() and "ion" not in path.relative_to(full_run["cwd"]).parts:
            content = path.read_text(errors="replace")
            assert not [s for s in FORBIDDEN if s in content], f"secret in {path}"


def test_prefect_api_holds_no_secret(full_run: dict) -> None:
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    with httpx.Client(base_url=api, timeout=30) as http:
        runs = http.post("/flow_runs/filter", json={"flow_runs": {"name": {"like_": EVENT_ID}}}).json()
        assert sorted(r["name"] for r in runs) == sorted([f"ready-secure-{EVENT_ID}"] + [f"done-secure-{EVENT_ID}"] * 2)
        ids = [r["id"] for r in runs]
        logs = http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": ids}}, "limit": 200}).json()
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}).json()
    # The sidecar stopped on SIGTERM: its shutdown still sent every run's lines to the API.
    assert {entry["flow_run_id"] for entry in logs} == set(ids)
    messages = "\n".join(entry["message"] for entry in logs)
    assert "probe.json" in messages and "event type '***'" in messages  # Prefect's own failure lines
    parameters = json.dumps([r["parameters"] for r in runs] + [t.get("task_inputs") for t in tasks])
    leaks = [(where, s) for where, text in (("logs", messages), ("parameters", parameters))
             for s in FORBIDDEN if s in text]
    assert not leaks, f"secrets in Prefect's run history: {leaks}"
