"""End to end in development mode: two real sidecar processes chained parent -> child through .dev/,
each with a real module process (examples/module.py) that behaves like Ion's example module."""

from __future__ import annotations

import json
from pathlib import Path

from testsupport.processes import SidecarProcess, dev_args, run_child_of_file2, run_module


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
    assert (dev / "dumps" / "evt-root" / "parent" / "dev.done").is_file() and (dev / "dumps" / "evt-root" / "parent" / "insight.json").is_file()

    # Start the child from the event of file2 as Ion's dispatcher would: its event id from the bus.
    event_file = next(p for p in (dev / "events").glob("*.json")
                      if json.loads((dev / "dumps" / "evt-root" / "parent" / "eventmeta" / p.name).read_text())["files"][0]["path"] == "found/file2.txt")
    event = json.loads(event_file.read_text())
    assert event["type"] == "file_discovered" and event["context"]["parentEventId"] == "evt-root"
    child_args = dev_args(event["context"]["eventId"], event["context"]["correlationId"], "child",
                          parent=event["context"]["parentEventId"])
    run_child_of_file2(tmp_path, child_args)
