"""Benchmark: what the sidecar adds to a bare Prefect flow run of the same shape.

Measured side by side in one run, against one Prefect API server (``prefect server start`` started here
unless PREFECT_API_URL is set):

- sidecar: round trip of ``GET /ready`` with nothing to stage and ``GET /done`` with nothing to commit,
  timed by the caller, each the first call to a fresh ``sidecar`` process in development mode (a
  sidecar serves one module run, so every sample is a new process);
- bare async: the same flow shapes (ready: one task that finds no event meta, then writes in/meta.json;
  done: read out/, no tasks) as plain Prefect async flows, each the first flow run of a fresh process;
- bare sync: the same as sync flows, to show the heartbeat wait that async flows avoid.

Prints medians (seconds) and the ratios sidecar / bare async. Usage: ``.venv/bin/python bench/overhead.py [N]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testsupport.processes import (SidecarProcess, dev_args, python_env, start_prefect_server,  # noqa: E402
                           stop_process_group)

BARE = r'''
import asyncio, json, sys, time
from pathlib import Path
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

base = Path(sys.argv[2]); mode = sys.argv[1]

@task(name="get-event-meta", persist_result=False, cache_policy=NO_CACHE)
async def get_meta_async():
    return None

@task(name="get-event-meta", persist_result=False, cache_policy=NO_CACHE)
def get_meta_sync():
    return None

@flow(name="ready", persist_result=False)
async def ready_async():
    await get_meta_async()
    (base / "meta.json").write_text("[]")

@flow(name="done", persist_result=False)
async def done_async():
    list((base / "out").glob("**/*"))

@flow(name="ready", persist_result=False)
def ready_sync():
    get_meta_sync()
    (base / "meta.json").write_text("[]")

@flow(name="done", persist_result=False)
def done_sync():
    list((base / "out").glob("**/*"))

def timed(call):
    start = time.perf_counter(); call(); return time.perf_counter() - start

if mode == "async":
    r = timed(lambda: asyncio.run(ready_async())); d = timed(lambda: asyncio.run(done_async()))
else:
    r = timed(ready_sync); d = timed(done_sync)
print(json.dumps({"ready": r, "done": d}))
'''


def sidecar_sample(work: Path, i: int) -> dict[str, float]:
    cwd = work / f"sidecar-{i}"
    cwd.mkdir()
    with SidecarProcess(cwd, dev_args(f"bench-{i}", "bench", "bench")) as sidecar:
        sidecar.wait_healthy()
        start = time.perf_counter()
        assert sidecar.get("/ready").status_code == 200
        ready = time.perf_counter() - start
        start = time.perf_counter()
        assert sidecar.get("/done").status_code == 200
        done = time.perf_counter() - start
    return {"ready": ready, "done": done}


def bare_sample(work: Path, mode: str, i: int) -> dict[str, float]:
    base = work / f"bare-{mode}-{i}"
    (base / "out").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-c", BARE, mode, str(base)], env=python_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    server = None
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    if not os.environ.get("PREFECT_API_URL"):
        server, url = start_prefect_server(home, record_task_runs=False)
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = str(home)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            rows: dict[str, list[dict[str, float]]] = {"sidecar": [], "bare async": [], "bare sync": []}
            for i in range(samples):  # interleaved, so drift hits every column alike
                rows["sidecar"].append(sidecar_sample(work, i))
                rows["bare async"].append(bare_sample(work, "async", i))
                rows["bare sync"].append(bare_sample(work, "sync", i))
        med = {name: {k: statistics.median(s[k] for s in rows[name]) for k in ("ready", "done")} for name in rows}
        print(f"median of {samples} samples, seconds (each sample: first call in a fresh process)")
        print(f"{'':12}{'ready':>10}{'done':>10}")
        for name, m in med.items():
            print(f"{name:12}{m['ready']:10.3f}{m['done']:10.3f}")
        for step in ("ready", "done"):
            ratio = med["sidecar"][step] / med["bare async"][step]
            sync = med["bare sync"][step] / med["bare async"][step]
            print(f"/{step}: sidecar / bare async flow = {ratio:.2f} (goal <= 1.30); bare sync / bare async = {sync:.2f}")
    finally:
        if server:
            stop_process_group(server)


if __name__ == "__main__":
    main()
