"""The work-pool launcher: the example graph (discover -> hash -> summarise) run by ``ion-offline
--launcher=workpool``, each attempt a deployment run that a real ``prefect worker`` (a process work pool
created from ``deploy/workpool/process.json``) picks up and runs, all under the graph's flow run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.offline.support import EXAMPLE, check_inputs_match_parents, graph_run_in_prefect, leftovers, run_offline, summary
from testsupport.processes import ROOT, python_env, stop_process_group

TEMPLATE = ROOT / "deploy" / "workpool" / "process.json"


@pytest.fixture(scope="module")
def process_worker(tmp_path_factory: pytest.TempPathFactory):
    """A process work pool (from the project's base job template) and a ``prefect worker`` polling it."""
    folder = tmp_path_factory.mktemp("worker")
    pool = f"ion-offline-test-{int(time.time())}"
    created = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process",
                              "--base-job-template", str(TEMPLATE)], env=python_env(), capture_output=True,
                             text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    log = folder / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                   "process", "--limit", "4"], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                  env=python_env(PREFECT_WORKER_QUERY_SECONDS="1", PYTHONUNBUFFERED="1"),
                                  start_new_session=True)
    try:
        yield pool, log
    finally:
        stop_process_group(worker)


def test_the_example_graph_runs_on_a_process_work_pool(process_worker, tmp_path: Path) -> None:
    pool, worker_log = process_worker
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(EXAMPLE / "data" / "blob.bin", files / "blob.bin")
    cid = f"corr-workpool-{int(time.time())}"
    started = time.monotonic()
    result = run_offline(EXAMPLE / "graph.yaml", "--launcher", "workpool", "--workpool", pool, "--files", str(files),
                         "--correlationid", cid, "--rundir", str(tmp_path / "run"), cwd=tmp_path)
    print(f"work-pool graph run: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr + worker_log.read_text()
    runs = summary(tmp_path / "run")
    assert sorted((r["module"], r["status"], r["attempts"]) for r in runs) == [
        ("discover", "Completed", 1), ("hash", "Completed", 1), ("summarise", "Completed", 1)]
    assert check_inputs_match_parents(tmp_path / "run", files) == 1 + 1 + 2  # discover, hash, summarise (file + .sha256)

    graph, tasks, children = graph_run_in_prefect(cid)
    assert graph.state.is_completed()
    module_runs = [t for t in tasks if t.name.split("-")[0] in ("discover", "hash", "summarise")
                   and f"correlation:{cid}" in t.tags]
    assert len(module_runs) == 3 and all(t.state.is_completed() for t in module_runs)
    # Each attempt is a deployment run of module-run/ion-offline, a child of the graph run, run by the worker.
    assert sorted(c.name.split("-")[0] for c in children) == ["discover", "hash", "summarise"]
    for child in children:
        assert child.state.is_completed() and child.work_pool_name == pool and f"correlation:{cid}" in child.tags
        assert child.name.endswith("-attempt-1")
    summary_json = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_json["correlationId"] == cid
    assert leftovers(cid) == []


def test_a_work_pool_missing_from_the_api_is_one_line_before_anything_is_seeded(tmp_path: Path) -> None:
    """A --workpool the Prefect API does not hold (created on another server, or not at all): exit 2 with
    one line saying where it was looked for and how to create it there, before the graph's event is
    seeded (a fresh user got 93 lines of traceback after the seed)."""
    pool = f"no-such-pool-{int(time.time())}"
    result = run_offline(EXAMPLE / "graph.yaml", "--launcher", "workpool", "--workpool", pool,
                         "--correlationid", f"corr-nopool-{int(time.time())}", "--rundir", str(tmp_path / "run"),
                         cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ion-offline: error:")]
    assert len(errors) == 1 and f"work pool '{pool}' does not exist in the Prefect API at http" in errors[0], result.stderr
    assert "work-pool create" in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run" / ".dev" / "events").exists() or not any((tmp_path / "run" / ".dev" / "events").rglob("*.json"))


def test_the_kubernetes_base_job_template_is_accepted_by_prefect() -> None:
    # Not run on a cluster here; Prefect's server checks that every {{ placeholder }} of the job
    # configuration is a declared variable and that the variables are a JSON schema.
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "deploy" / "workpool" / "kubernetes.json").read_text())
    broken = json.loads(json.dumps(template))
    del broken["variables"]["properties"]["graph_runs_claim"]
    pool = f"ion-offline-k8s-{int(time.time())}"

    async def create() -> tuple[object, Exception | None]:
        async with get_client() as api:
            created = await api.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
            try:
                await api.create_work_pool(WorkPoolCreate(name=f"{pool}-broken", type="kubernetes",
                                                          base_job_template=broken))
            except Exception as exc:  # noqa: BLE001 - the refusal is what is tested
                return created, exc
            return created, None

    created, refused = asyncio.run(create())
    variables = created.base_job_template["variables"]["properties"]
    assert variables["image"]["default"] == "ion-sidecar:local" and "graph_runs_claim" in variables
    assert refused is not None and "graph_runs_claim" in str(refused)
