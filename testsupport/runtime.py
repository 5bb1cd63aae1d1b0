"""In-process runtimes for tests that drive the app with FastAPI's TestClient, and module outputs to
commit through them. A runtime's flows run on the session's Prefect server (``PREFECT_API_URL``)."""

from __future__ import annotations

import json
from pathlib import Path

from flows.runtime import Runtime
from sidecar.cli import compose_config

API_SECRET = "api-secret"
H = {"secret": API_SECRET}  # the header every call of a :func:`dev_runtime` carries


def dev_runtime(tmp_path: Path, *extra: str) -> Runtime:
    """A development-mode runtime (module folders in ``tmp_path/ion``, data plane in ``tmp_path/.dev``,
    event types ``found``, no task retries); ``extra`` flags are added last, so they win."""
    cfg, _ = compose_config([
        "--context.eventid=evt-api", "--context.correlationid=corr-api", "--context.name=mod",
        f"--sharedsecret={API_SECRET}", "--valideventtypes=found", f"--basedir={tmp_path / 'ion'}",
        f"--devdir={tmp_path / '.dev'}", "--development=true", "--transfer.retries=0", *extra,
    ])
    return Runtime.for_config(cfg)


def write_found_outputs(runtime: Runtime, n: int = 2) -> None:
    """``n`` small files ``f{i}.txt`` in out/data, each with one ``found`` event naming it."""
    lay = runtime.layout
    for i in range(n):
        (lay.out_data / f"f{i}.txt").write_text(f"file {i}")
        (lay.out_events / f"e{i}.json").write_text(json.dumps(
            [{"key": "eventType", "value": "found"}, {"key": "files", "value": f"f{i}.txt"}]))


def write_module_outputs(basedir: Path, files: int, size: int, label: str) -> None:
    """A module's outputs through the module client: ``files`` files of ``size`` bytes, one
    ``file_discovered`` event each, and an insight."""
    from ion_sidecar_client import SidecarClient

    client = SidecarClient(url="http://unused", secret="unused", basedir=basedir)
    for i in range(files):
        path = f"out{i}/file{i}.bin"
        client.write_file(path, (f"{label}:{i}:".encode() * (size // 8 + 1))[:size])
        client.write_event(f"event{i}", "file_discovered", [path], index=str(i), label=label)
    client.write_insight(files=str(files), label=label)
