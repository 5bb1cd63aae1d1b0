"""Benchmark of the Azure Blob provider against a plain client, side by side in one run (issue 3).

Against one Azurite (started here, as the tests start it) and one Prefect API, for each workload

- ``1000 x 4 KiB`` and ``8 x 64 MiB`` files in ten subfolders,

it times, interleaved, at least three rounds of

- sidecar: a real parent sidecar process's ``/done`` (uploads ``out/data``, records one child event
  listing every file) plus a real child sidecar process's ``/ready`` (downloads them into ``in/data``),
  both with the default settings and ``--azureblobprovider=true``; the processes are started and
  healthy before the clock starts;
- plain: the same upload then download with ``azure.storage.blob.aio`` only: ``asyncio.gather`` under a
  semaphore of 32, 4 MiB chunks (``max_single_put_size``/``max_block_size``/``max_single_get_size``/
  ``max_chunk_get_size``), otherwise the SDK's defaults, in its own process (the issue's baseline);
- plain-noenv: the same with ``use_env_settings=False``, which the provider also sets (see
  ``sidecar/dataplane/azure.py``), to show what is left of the sidecar's own cost,

and prints the medians, the ratios sidecar/plain and sidecar/plain-noenv, and the peak RSS of each
sidecar process during its call (and of the plain client's process). Last, one parent/child pair
moves a 1 GiB file and the rise of each sidecar's RSS above its idle RSS (just before the call) is
printed.

Run: ``scripts/setup test && .venv/bin/python bench/azure_transfers.py [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
CHUNK = 4 * MiB
PLAIN_CONCURRENCY = 32
WORKLOADS = {"1000 x 4 KiB": (1000, 4 * KiB), "8 x 64 MiB": (8, 64 * MiB)}
EVENT_TYPE = "file_discovered"


# --- the plain client (in its own process: ``azure_transfers.py plain SRC DST PREFIX ENV``) ------------

async def plain_transfer(connection_string: str, src: Path, dst: Path, prefix: str, env_settings: bool) -> float:
    """Upload every file under ``src`` then download them into ``dst``; returns the seconds taken.

    ``env_settings`` is the SDK's ``use_env_settings`` (default True: aiohttp looks up ~/.netrc and the
    proxy variables on every request; the provider turns it off and resolves the proxy once)."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob.aio import BlobServiceClient

    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    service = BlobServiceClient.from_connection_string(
        connection_string, max_single_put_size=CHUNK, max_block_size=CHUNK, max_single_get_size=CHUNK,
        max_chunk_get_size=CHUNK, use_env_settings=env_settings)
    async with service:
        client = service.get_container_client("bench-plain")
        try:
            await client.create_container()
        except ResourceExistsError:
            pass
        limit = asyncio.Semaphore(PLAIN_CONCURRENCY)

        async def upload(rel: str) -> None:
            async with limit:
                with open(src / rel, "rb") as f:
                    await client.get_blob_client(f"{prefix}/{rel}").upload_blob(f, overwrite=True)

        async def download(rel: str) -> None:
            async with limit:
                target = dst / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                stream = await client.get_blob_client(f"{prefix}/{rel}").download_blob()
                with open(target, "wb") as f:
                    await stream.readinto(f)

        started = time.perf_counter()
        await asyncio.gather(*(upload(rel) for rel in files))
        await asyncio.gather(*(download(rel) for rel in files))
        return time.perf_counter() - started


# --- measuring ----------------------------------------------------------------------------------------

class RssSampler:
    """Samples the RSS of process ``pid`` every 10 ms while active: ``idle`` (first sample), ``peak``."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.idle = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


APPROACHES = ("plain", "plain-noenv", "sidecar")


@dataclass
class Rounds:
    """Seconds and peak RSS (bytes) of each round of one workload, per approach (``APPROACHES``);
    for the sidecar the RSS is the larger of the parent's during ``/done`` and the child's during ``/ready``."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in APPROACHES})
    rss: dict[str, list[int]] = field(default_factory=lambda: {a: [] for a in APPROACHES})


def make_files(root: Path, count: int, size: int, sparse: bool = False) -> list[str]:
    """``count`` files of ``size`` bytes in ten subfolders of ``root``; returns their relative paths."""
    rels = [f"d{i % 10}/f{i:04d}.bin" for i in range(count)]
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            if sparse:
                f.truncate(size)
            else:
                for _ in range(0, size, MiB):
                    f.write(os.urandom(min(MiB, size)))
    return rels


def plain_round(azurite, src: Path, work: Path, prefix: str, env_settings: bool) -> tuple[float, int]:
    """One plain upload + download in a fresh process; returns its seconds and peak RSS (bytes)."""
    from tests.support import python_env

    dst = work / f"plain-{prefix}"
    argv = [sys.executable, __file__, "plain", str(src), str(dst), prefix, str(int(env_settings))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                            env=python_env(BENCH_CONNECTION_STRING=azurite.connection_string()))
    with RssSampler(proc.pid) as rss:
        out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"plain client failed ({proc.returncode})")
    shutil.rmtree(dst, ignore_errors=True)
    return float(out.decode().strip().splitlines()[-1]), rss.peak


def sidecar_round(azurite, src: Path, rels: list[str], work: Path, tag: str) -> dict[str, float]:
    """One parent ``/done`` plus child ``/ready``; returns seconds, and idle/peak RSS of each process."""
    from flows.runtime import child_event_id
    from sidecar.config import ContextConfig, SidecarConfig
    from tests.azure.azurite import sidecar_args
    from tests.support import SidecarProcess

    parent_id, correlation = f"bench-{tag}", f"corr-{tag}"
    parent_cfg = SidecarConfig(context=ContextConfig(eventid=parent_id, correlationid=correlation, name="parent"))
    child_id = child_event_id(parent_cfg, "batch.json")
    devdir = f"--devdir={work / f'dev-{tag}'}"  # the document store the two share
    (work / f"parent-{tag}").mkdir()
    (work / f"child-{tag}").mkdir()
    parent_args = sidecar_args(azurite, "bench-sidecar", parent_id, correlation, "parent") + [devdir]
    child_args = sidecar_args(azurite, "bench-sidecar", child_id, correlation, "child", parent=parent_id) + [devdir]
    parent = SidecarProcess(work / f"parent-{tag}", parent_args)
    child = SidecarProcess(work / f"child-{tag}", child_args)
    try:
        parent.wait_healthy(120)
        child.wait_healthy(120)
        assert parent.get("/ready").status_code == 200, parent.output()
        out = parent.basedir / "out"
        for rel in rels:
            (out / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(src / rel, out / "data" / rel)
        pairs = [{"key": "eventType", "value": EVENT_TYPE}, {"key": "files", "value": ",".join(rels)}]
        (out / "events" / "batch.json").write_text(json.dumps(pairs))
        with RssSampler(parent.proc.pid) as done_rss:
            started = time.perf_counter()
            done = parent.get("/done", timeout=900)
            done_seconds = time.perf_counter() - started
        assert done.status_code == 200, done.text
        assert done.json()["events"][0]["eventId"] == child_id
        with RssSampler(child.proc.pid) as ready_rss:
            started = time.perf_counter()
            ready = child.get("/ready", timeout=900)
            ready_seconds = time.perf_counter() - started
        assert ready.status_code == 200 and ready.json()["files"] == len(rels), ready.text
    finally:
        parent.stop()
        child.stop()
    shutil.rmtree(work / f"parent-{tag}", ignore_errors=True)
    shutil.rmtree(work / f"child-{tag}", ignore_errors=True)
    return {"seconds": done_seconds + ready_seconds, "done": done_seconds, "ready": ready_seconds,
            "done_idle": done_rss.idle, "done_peak": done_rss.peak,
            "ready_idle": ready_rss.idle, "ready_peak": ready_rss.peak}


def mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def main(rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-azure-"))
    os.environ.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_UI_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.server.api.server import SubprocessASGIServer

    from tests.azure.azurite import run_azurite

    prefect = SubprocessASGIServer()
    prefect.start(120)
    os.environ["PREFECT_API_URL"] = prefect.api_url
    results: dict[str, Rounds] = {name: Rounds() for name in WORKLOADS}
    began = time.perf_counter()
    try:
        with run_azurite() as azurite:
            sources = {}
            for name, (count, size) in WORKLOADS.items():
                sources[name] = (work / f"src-{count}", make_files(work / f"src-{count}", count, size))
            for r in range(rounds):
                for w, (name, (src, rels)) in enumerate(sources.items()):
                    # Rotate which approach goes first, so drift in the machine's load evens out.
                    for approach in APPROACHES[r % 3:] + APPROACHES[:r % 3]:
                        tag = f"{r}-{w}-{approach}"
                        if approach == "sidecar":
                            got = sidecar_round(azurite, src, rels, work, tag)
                            seconds, peak = got["seconds"], int(max(got["done_peak"], got["ready_peak"]))
                        else:
                            seconds, peak = plain_round(azurite, src, work, tag, approach == "plain")
                        results[name].seconds[approach].append(seconds)
                        results[name].rss[approach].append(peak)
                        print(f"round {r + 1} {name:>13} {approach:>11}: {seconds:7.2f} s", flush=True)
            big = work / "src-1g"
            rels = make_files(big, 1, GiB, sparse=True)
            one_gib = sidecar_round(azurite, big, rels, work, "1g")
    finally:
        prefect.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nAzure Blob provider vs plain azure.storage.blob.aio on Azurite: medians of {rounds} rounds, "
          f"peak RSS the largest of them (whole run {time.perf_counter() - began:.0f} s)")
    print("plain: the SDK's defaults but 4 MiB chunks, gather under a semaphore of 32; plain-noenv: the same with "
          "use_env_settings=False, as the provider does")
    print(f"{'workload':>13} | {'plain s':>8} | {'noenv s':>8} | {'sidecar s':>9} | {'sidecar/plain':>13} | "
          f"{'sidecar/noenv':>13} | peak RSS MiB plain, noenv, sidecar")
    for name, res in results.items():
        median = {a: statistics.median(res.seconds[a]) for a in APPROACHES}
        peaks = ", ".join(mib(max(res.rss[a])) for a in APPROACHES)
        print(f"{name:>13} | {median['plain']:8.2f} | {median['plain-noenv']:8.2f} | {median['sidecar']:9.2f} | "
              f"{median['sidecar'] / median['plain']:12.2f}x | {median['sidecar'] / median['plain-noenv']:12.2f}x | "
              f"{peaks}")
    print(f"\n1 GiB file: parent /done {one_gib['done']:.1f} s, RSS idle {mib(one_gib['done_idle'])} MiB, peak "
          f"{mib(one_gib['done_peak'])} MiB, rise {mib(one_gib['done_peak'] - one_gib['done_idle'])} MiB; "
          f"child /ready {one_gib['ready']:.1f} s, RSS idle {mib(one_gib['ready_idle'])} MiB, peak "
          f"{mib(one_gib['ready_peak'])} MiB, rise {mib(one_gib['ready_peak'] - one_gib['ready_idle'])} MiB")
    print("goals: ratio <= 1.10x on both workloads; RSS rise <= 128 MiB for the 1 GiB file")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        _, _, source, target, prefix, env = sys.argv
        connection_string = os.environ["BENCH_CONNECTION_STRING"]
        print(asyncio.run(plain_transfer(connection_string, Path(source), Path(target), prefix, env == "1")))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rounds", type=int, default=3, help="rounds per workload and approach (medians)")
        main(parser.parse_args().rounds)
