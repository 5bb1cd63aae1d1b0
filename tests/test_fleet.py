"""A fleet: N module runs at once (parent and child sidecar processes) against one Prefect server on
PostgreSQL. Every call answers 200 at the first try and every flow and task run ends Completed in the
API. ``FLEET_RUNS`` sets N per wave: CI runs 10 (a shared 2-core machine cannot start 30 sidecar
processes within the suite's budget); ``FLEET_RUNS=30 scripts/test -k fleet`` is the issue's size and
``FLEET_RUNS=60`` its goal."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fleet import run_fleet
from tests.support import read_runs

import pytest

RUNS = int(os.environ.get("FLEET_RUNS", "10"))
pytestmark = pytest.mark.timeout(1800)


def test_fleet_on_postgres(tmp_path: Path, prefect_on_postgres, monkeypatch) -> None:
    api_url, _ = prefect_on_postgres
    parents, children = run_fleet(tmp_path, api_url, RUNS)
    assert parents.failures == [] and children.failures == []
    flow_run_ids = parents.flow_run_ids + children.flow_run_ids
    assert len(flow_run_ids) == 4 * RUNS  # ready and done, parents and children
    monkeypatch.setenv("PREFECT_API_URL", api_url)
    import prefect.context

    prefect.context.refresh_global_settings_context()
    try:
        # Per module run: get-event-meta (both), download (children), upload, insight, metas, publish.
        expected = RUNS * (1 + 4) + RUNS * (2 + 4)
        flow_runs, task_runs = read_runs(
            flow_run_ids, lambda trs: len(trs) >= expected and all(t.state_type.value == "COMPLETED" for t in trs),
            timeout=120)
    finally:
        monkeypatch.undo()
        prefect.context.refresh_global_settings_context()
    assert sorted({f.state_type.value for f in flow_runs}) == ["COMPLETED"]
    assert len(task_runs) >= expected, len(task_runs)
    bad = [(t.name, t.state_type.value) for t in task_runs if t.state_type.value != "COMPLETED"]
    assert not bad, bad
    print(f"fleet of {RUNS}: parents {parents.seconds:.1f}s (start-up {parents.startup_seconds:.1f}s), "
          f"children {children.seconds:.1f}s, slowest call {max(parents.slowest_call, children.slowest_call):.1f}s")
