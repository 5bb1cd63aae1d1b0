"""End to end in development mode: two real sidecar processes chained parent -> child through .dev/,
each with a real module process (examples/module.py) that behaves like Ion's example module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, SECRET, SidecarProcess, dev_args, python_env


def run_module(sidecar: SidecarProcess, **env: str) -> list[dict]:
    """Run examples/module.py against ``sidecar``; returns the JSON lines it printed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "module.py")],
        env=python_env(SHARED_SECRET=SECRET, SIDECAR_PORT=str(sidecar.port), SIDECAR_BASEDIR=str(sidecar.basedir), **env),
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{result.stderr}\n--- sidecar ---\n{sidecar.output()}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_parent_then_child_chain(tmp_path: Path) -> None:
    # The module is started first: its /ready retry loop must cover the sidecar's start-up.
    with SidecarProcess(tmp_path, dev_args("evt-root", "corr-1", "parent")) as parent:
        lines = run_module(parent, EVENT_LABEL="root")
    done = lines[-1]["done"]
    assert done["files"] == 5 and len(done["events"]) == 5
    assert {e["eventType"] for e in done["events"]} == {"file_discovered"}

    dev = tmp_path / ".dev"
    published = sorted(p.stem for p in (dev / "events").glob("*.json"))
    assert published == sorted(e["eventId"] for e in done["events"])
    assert (dev / "dumps" / "evt-root" / "dev.done").is_file() and (dev / "dumps" / "evt-root" / "insight.json").is_file()

    # Start the child from the event of file2 as Ion's dispatcher would: its event id from the bus.
    event_file = next(p for p in (dev / "events").glob("*.json")
                      if json.loads((dev / "dumps" / "evt-root" / "eventmeta" / p.name).read_text())["files"][0]["path"] == "found/file2.txt")
    event = json.loads(event_file.read_text())
    assert event["type"] == "file_discovered" and event["context"]["parentEventId"] == "evt-root"
    child_args = dev_args(event["context"]["eventId"], event["context"]["correlationId"], "child",
                          parent=event["context"]["parentEventId"])
    run_child_of_file2(tmp_path, child_args)


def run_child_of_file2(tmp_path: Path, child_args: list[str]) -> list[dict]:
    """Run the child sidecar and module for the parent's file2 event in the same working directory
    (the chain goes through the data plane), check what it staged; returns the module's JSON lines."""
    (tmp_path / "ion").rename(tmp_path / "ion-parent")
    with SidecarProcess(tmp_path, child_args) as child:
        lines = run_module(child, EVENT_LABEL="child", FILES="1")
    staged = lines[0]
    assert staged["inputs"] == ["found/file2.txt"]
    assert (tmp_path / "ion" / "in" / "data" / "found" / "file2.txt").read_bytes() == \
        (tmp_path / "ion-parent" / "out" / "data" / "found" / "file2.txt").read_bytes()
    assert staged["meta"]["index"] == "2" and "eventType" not in staged["meta"] and "files" not in staged["meta"]
    assert staged["ready"]["files"] == 1 and staged["ready"]["bytes"] > 0
    return lines
