"""Blob transfers through the sidecar against the strongest plain SDK client, side by side in one run.

Against one Azurite (from ``.tools/``, started here as the tests start it) and one Prefect server, for
each workload (``1000 x 4 KiB`` and ``8 x 64 MiB`` files of random bytes in ten subfolders) it times,
in ``--rounds`` rounds (3 by default: medians want three or more) whose order of approaches rotates, each
direction on its own:

- sidecar upload: a real parent sidecar process's ``/done`` (uploads ``out/data``, records one child
  event listing every file); sidecar download: a real child sidecar process's ``/ready`` (downloads them
  into ``in/data``, each checked by size and MD5). Both processes run with the default settings and
  ``--azureblobprovider=true`` and are started and healthy before the clock starts.
- plain upload / plain download: ``azure.storage.blob.aio`` only, each direction in a fresh process
  (fresh connections, as a fresh sidecar has): ``upload_blob(file, max_concurrency=P)`` and
  ``download_blob(max_concurrency=P).readinto(file)``, ``F`` files at once under a semaphore, chunk
  size ``C`` (``max_single_put_size``, ``max_block_size``, ``max_single_get_size``,
  ``max_chunk_get_size``), ``use_env_settings=False``, and for large uploads ``validate_content=True``.
- plain+md5 (``--md5-baseline``): the same client, tuned the same, giving the sidecar's integrity
  guarantee: each upload records the whole file's MD5 (``ContentSettings.content_md5``, hashed in a
  worker thread before the upload with ``hashlib.file_digest``), and each download hashes the bytes in
  file order as the SDK writes its chunks (:class:`HashingFile`) and compares the blob's Content-MD5.
  The sidecar / plain+md5 ratio is the sidecar's cost beyond the MD5 work the plain client skips.
- plain-rest (``--rest-baseline``, small files only): the same client sending each file in one Get Blob
  or Put Blob through the SDK's pipeline (``client._pipeline``), as the sidecar does
  (``sidecar/providers/azureblob/rest.py``), without a ``BlobClient`` per blob or its header parsing,
  and checking nothing. The plain client above is what a user writes with the SDK's public API; this one
  is what is left of the SDK's cost, so sidecar / plain-rest is the sidecar's own cost per call (its
  Prefect flow run, its checks and records) on small files.

How the plain client was tuned: ``--tune`` times it over a grid (``TUNE_GRID``: files at once 32/64/128
for small files; chunk 4/8 MiB x 2/4/8 per blob x with or without MD5 for large ones, and each file in
one 64 MiB request, which lost both ways: up 3.5-4.0 s against 2.6 s, down 1.8 s against 1.3-1.5 s) and
``PLAIN`` holds the fastest per workload and direction. On this machine 64 small files at once beat 16, 32 and
128; for large uploads a Content-MD5 on every block (``validate_content=True``) is faster, not slower,
because Azurite computes a CRC64 in JavaScript for every Put Block that comes without one
(``BlockBlobHandler.stageBlock``), which costs it more than the client's MD5. The plain client checks
nothing else: the strongest client does the least work; the bench checks its files' MD5s afterwards.
The CPU seconds of each process during its transfer are printed beside the wall times: on a loaded
machine they say where a gap comes from (own work or waiting) better than the wall times do. So are
Azurite's CPU seconds meanwhile (on 2 cores the service competes with the client: 4 MiB ranges cost
Azurite about three times the CPU of 8 MiB ranges for the same bytes) and, for the sidecar, the
seconds of the flow's body from its summary (the rest of the call is the flow run's overhead) and, in
each round's line, "Prefect": the CPU seconds of the Prefect server's and PostgreSQL's processes during
the call (the flow run's bookkeeping, on the same cores). The table's columns: the plain and the
sidecar's seconds (median [min-max]), their ratio, each one's CPU seconds, Azurite's CPU seconds meanwhile,
the sidecar's flow body, and the peak RSS of each process with the sidecar's rise above its idle RSS.
The last line judges the issue's goals on what ran.

No file is deleted until the whole run ends (the work folder is removed then). This machine's root
file system is ext4 without a journal, where allocating an inode skips every inode of its group
deleted in the last 60 s (``recently_deleted`` in fs/ext4/ialloc.c, checked only without a journal):
after a round's clean-up removed 1000-3000 files, creating the next approach's 1000 files cost 0.2-0.8 s
of CPU instead of 0.03-0.15 s (perf: ``recently_deleted`` and ``find_get_block_common`` under
``ext4_create`` were 20% of a child sidecar's /ready), a tax on whichever approach came next rather
than on either's own work. A run needs about 15 GB of free disk.

It prints medians, spreads (min-max) and the ratios sidecar / plain per direction, the CPU seconds and
peak RSS of each process, then moves one 1 GiB file of random bytes both ways (sidecar and plain) and
prints the RSS rise of each sidecar above its idle RSS (``--rounds-1gib``, 2 by default, rotating); the
MD5s of the sources, of what the event meta recorded and of what the child staged must agree (else the
bench fails).

Run: ``scripts/setup test && .venv/bin/python bench/azure_transfers.py [--rounds 3]`` (10-30 min);
``--tune`` for the plain client's grid; ``--profile DIR`` records each sidecar call with py-spy
(``uv pip install py-spy``; not a dependency) and prints where the samples went (``PROFILE_GROUPS``).
``--variant NAME=SRC[,FLAG...]`` (repeatable) adds a sidecar that imports its code from the checkout
``SRC`` (e.g. a git worktree of another commit; ``.`` for this one) with extra seed flags, as one more
approach in the same rotation, so two versions or settings are compared side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import shutil
import signal
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
GOAL_RATIO = 1.10  # issue 13: sidecar / plain, each direction, each workload
GOAL_RISE = 128 * MiB  # issue 13: the sidecar's RSS rise moving the 1 GiB file
WORKLOADS = {"1000 x 4 KiB": (1000, 4 * KiB), "8 x 64 MiB": (8, 64 * MiB)}
EVENT_TYPE = "file_discovered"
CONTAINER = "bench"


@dataclass(frozen=True)
class Plain:
    """The plain client's settings: ``chunk`` bytes per request, ``per_blob`` requests in flight per
    blob (the SDK's ``max_concurrency``), ``files`` blobs in flight at once, and ``md5``: upload with
    ``validate_content=True`` (a Content-MD5 on every request)."""

    chunk: int
    per_blob: int
    files: int
    md5: bool = False
    whole_md5: bool = False
    rest: bool = False  # files of one request as Get/Put Blob sent through the SDK's pipeline, as the sidecar sends them

    def argv(self) -> list[str]:
        return [str(self.chunk), str(self.per_blob), str(self.files), str(int(self.md5)), str(int(self.whole_md5)),
                str(int(self.rest))]

    def __str__(self) -> str:
        return (f"chunk {self.chunk // MiB:>2} MiB, per blob {self.per_blob}, files {self.files:>3}, md5 {int(self.md5)}"
                + (", whole-file MD5" if self.whole_md5 else "") + (", REST for one-request files" if self.rest else ""))

    def with_whole_md5(self) -> "Plain":
        return dataclasses.replace(self, whole_md5=True)

    def with_rest(self) -> "Plain":
        return dataclasses.replace(self, rest=True)


# The fastest settings per workload and direction of `--tune` on this machine (see README, Benchmarks).
PLAIN = {
    "1000 x 4 KiB": {"up": Plain(4 * MiB, 1, 64), "down": Plain(4 * MiB, 1, 64)},
    "8 x 64 MiB": {"up": Plain(4 * MiB, 4, 8, md5=True), "down": Plain(8 * MiB, 4, 8)},
    "1 x 1 GiB": {"up": Plain(4 * MiB, 8, 1, md5=True), "down": Plain(8 * MiB, 8, 1)},
}
TUNE_GRID = {
    "1000 x 4 KiB": [Plain(4 * MiB, 1, f, m) for f in (32, 64, 128) for m in (False, True)],
    "8 x 64 MiB": [Plain(c, p, 8, m) for c in (4 * MiB, 8 * MiB) for p in (2, 4, 8) for m in (False, True)]
                  # each file in one request (a 64 MiB Put Blob, a 64 MiB Get Blob), held whole in memory
                  + [Plain(64 * MiB, 1, 8, m) for m in (False, True)],
}


# --- the plain client (a process of its own: ``azure_transfers.py plain up|down SRC DST PREFIX C P F``) -

async def plain_transfer(connection_string: str, direction: str, src: Path, dst: Path, prefix: str,
                         cfg: Plain) -> dict[str, float]:
    """Upload every file under ``src`` (``up``) or download them into ``dst`` (``down``); returns the
    seconds taken and the process's RSS (bytes) just before the clock started."""
    import psutil
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import ContentSettings
    from azure.storage.blob.aio import BlobServiceClient

    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    service = BlobServiceClient.from_connection_string(
        connection_string, max_single_put_size=cfg.chunk, max_block_size=cfg.chunk,
        max_single_get_size=cfg.chunk, max_chunk_get_size=cfg.chunk, use_env_settings=False)
    async with service:
        client = service.get_container_client(CONTAINER)
        limit = asyncio.Semaphore(cfg.files)
        # plain-rest: what the sidecar's REST requests skip (a BlobClient and its header parsing per blob),
        # without its checks: no MD5 sent or compared.
        pipeline, version = client._pipeline, client.api_version

        async def rest(method: str, rel: str, **request: object) -> object:
            from urllib.parse import quote

            from azure.core.rest import HttpRequest

            headers = {"x-ms-version": version, **request.pop("headers", {})}
            url = f"{client.url}/{quote(f'{prefix}/{rel}', safe='~/')}"
            answer = (await pipeline.run(HttpRequest(method, url, headers=headers, **request), stream=True)).http_response
            if answer.status_code not in (200, 201, 206):
                raise RuntimeError(f"{method} {rel}: HTTP {answer.status_code}")
            return answer

        async def upload(rel: str) -> None:
            async with limit:
                if cfg.rest and (src / rel).stat().st_size <= cfg.chunk:
                    data = (src / rel).read_bytes()
                    answer = await rest("PUT", rel, content=data, headers={
                        "x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"})
                    await answer.read()
                    return
                with open(src / rel, "rb") as f:
                    settings = None
                    if cfg.whole_md5:
                        digest = await asyncio.to_thread(lambda: hashlib.file_digest(f, "md5").digest())
                        f.seek(0)
                        settings = ContentSettings(content_md5=bytearray(digest))
                    await client.get_blob_client(f"{prefix}/{rel}").upload_blob(
                        f, overwrite=True, max_concurrency=cfg.per_blob, validate_content=cfg.md5,
                        content_settings=settings)

        async def download(rel: str) -> None:
            async with limit:
                target = dst / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if cfg.rest:  # every file of the workloads it is run for fits one request
                    answer = await rest("GET", rel, headers={"x-ms-range": f"bytes=0-{cfg.chunk - 1}"})
                    data = b"".join([piece async for piece in answer.iter_raw()])
                    with open(target, "wb") as f:
                        f.write(data)
                    return
                stream = await client.get_blob_client(f"{prefix}/{rel}").download_blob(max_concurrency=cfg.per_blob)
                with open(target, "wb") as f:
                    if not cfg.whole_md5:
                        await stream.readinto(f)
                        return
                    hashing = HashingFile(f)
                    await stream.readinto(hashing)
                    recorded = stream.properties.content_settings.content_md5
                    if not recorded or bytes(recorded) != hashing.digest():
                        raise RuntimeError(f"{rel}: MD5 {hashing.digest().hex()} differs from Content-MD5")

        if direction == "up":
            try:
                await client.create_container()
            except ResourceExistsError:
                pass
        idle = psutil.Process().memory_info().rss
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*((upload if direction == "up" else download)(rel) for rel in files))
        return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "idle": idle}


class HashingFile:
    """A seekable file for ``StorageStreamDownloader.readinto`` that writes each chunk at its offset and
    hashes the bytes in file order: with ``max_concurrency`` > 1 the SDK seeks and writes its chunks as
    they arrive, so a chunk ahead of the hash waits in memory (at most ``max_concurrency`` of them)."""

    def __init__(self, f):
        self.f = f
        self.pos = 0
        self.hashed = 0
        self.md5 = hashlib.md5()
        self.ahead: dict[int, bytes] = {}

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos

    def write(self, data: bytes) -> int:
        os.pwrite(self.f.fileno(), data, self.pos)
        self.ahead[self.pos] = data
        self.pos += len(data)
        while (chunk := self.ahead.pop(self.hashed, None)) is not None:
            self.md5.update(chunk)
            self.hashed += len(chunk)
        return len(data)

    def digest(self) -> bytes:
        if self.ahead:
            raise RuntimeError(f"chunks past byte {self.hashed} were never joined: {sorted(self.ahead)}")
        return self.md5.digest()


# --- measuring ----------------------------------------------------------------------------------------

class RssSampler:
    """Samples the RSS of process ``pid`` every 5 ms while active: ``idle`` (first sample), ``peak``;
    ``cpu()``: CPU seconds (user + system) the process used since the sampler was made."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.idle = self.peak = self.process.memory_info().rss
        self._cpu = self._cpu_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return

    def _cpu_now(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def cpu(self) -> float:
        return self._cpu_now() - self._cpu

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Profiler:
    """``py-spy record`` of process ``pid`` into ``path`` (collapsed stacks) while active; no-op without a path."""

    def __init__(self, pid: int, path: Path | None):
        self.pid, self.path, self.proc = pid, path, None

    def __enter__(self) -> "Profiler":
        if self.path:
            spy = Path(sys.executable).with_name("py-spy")
            self.proc = subprocess.Popen([str(spy), "record", "--pid", str(self.pid), "--rate", os.environ.get("SPY_RATE", "250"), "--format",
                                          "raw", "--threads", "--nonblocking", "-o", str(self.path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)


# Where a sidecar's samples go (``--profile``; py-spy names frames "function (package/module.py:line)"): a
# sample counts for every group one of its frames matches. A worker thread's C call (an MD5 update, a
# pwrite, a read) shows as the thread pool's frame.
PROFILE_GROUPS = {
    "worker threads (MD5, file reads and writes)": r"\(concurrent/futures/thread\.py",
    "Azure SDK (azure.core, azure.storage.blob)": r"\((core|blob)/",
    "aiohttp": r"\(aiohttp/",
    "the blob provider (sidecar/providers/azureblob)": r"\(sidecar/providers/azureblob/",
    "Prefect (all)": r"\(prefect/",
    "Prefect flow engine": r"\(prefect/flow_engine\.py",
    "Prefect task engine": r"\(prefect/task_engine\.py",
    "Prefect client (httpx)": r"\((httpx|httpcore)/",
    "TLS contexts": r"create_default_context|load_verify_locations|_build_ssl_config|create_ssl_context",
    "uvicorn, starlette, fastapi": r"\((uvicorn|starlette|fastapi)/",
    "pydantic": r"\(pydantic",
    "run history (flows.history reports)": r"(report_ready|report_done|_publish|record_failure) \(flows/history",
    "path checks (sidecar.paths)": r"\(sidecar/paths\.py",
    "logging": r"\(logging/",
    "event loop waiting (epoll)": r"EpollSelector\.select",
}


def profile_summary(paths: list[Path], top: int = 12) -> list[str]:
    """Lines summarising ``py-spy record --format raw`` files: the share of samples per
    ``PROFILE_GROUPS`` group and the functions most often on top of the stack (self time)."""
    import re

    total, groups, leaves = 0, collections.Counter(), collections.Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            total += int(count)
            groups.update({name: int(count) for name, pattern in PROFILE_GROUPS.items() if re.search(pattern, stack)})
            leaves[stack.split(";")[-1]] += int(count)
    if not total:
        return ["    (no samples)"]
    lines = [f"    {total} samples (250 Hz, all threads, idle excluded)"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in groups.most_common()]
    lines += ["    on top of the stack:"] + [f"    {100 * n / total:5.1f}%  {name[:100]}" for name, n in leaves.most_common(top)]
    return lines


@dataclass
class Sample:
    """One measured transfer: ``seconds``, the process's CPU seconds meanwhile (user + system, all
    threads), its RSS ``idle`` (before the clock) and ``peak`` (bytes)."""

    seconds: float
    cpu: float
    idle: int
    peak: int
    azurite_cpu: float = 0.0  # Azurite's CPU seconds meanwhile: on 2 cores, the service's share of the machine
    body: float | None = None  # sidecar only: the flow body's seconds (the summary's), the rest is call overhead
    prefect_cpu: float = 0.0  # sidecar only: the Prefect server's and its database's CPU seconds meanwhile

    @staticmethod
    def median(samples: list["Sample"]) -> "Sample":
        """The medians of ``samples``' times; the RSS of the one whose RSS rose most (the memory bound's case)."""
        worst = max(samples, key=lambda s: s.peak - s.idle)
        bodies = [s.body for s in samples if s.body is not None]
        return Sample(statistics.median(s.seconds for s in samples), statistics.median(s.cpu for s in samples),
                      worst.idle, worst.peak, statistics.median(s.azurite_cpu for s in samples),
                      statistics.median(bodies) if bodies else None)


@dataclass
class Results:
    """Samples per (approach, direction) of one workload, e.g. ``samples["sidecar", "up"]``."""

    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, approach: str, direction: str, sample: Sample) -> None:
        self.samples.setdefault((approach, direction), []).append(sample)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# The Prefect server's and PostgreSQL's processes (``run`` fills it): their CPU during a sidecar's call is
# the flow run's bookkeeping, on the same 2 cores as the transfer.
PREFECT_PROCESSES: list[int] = []


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) processes ``pids`` and all their descendants have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


def make_files(root: Path, count: int, size: int) -> dict[str, str]:
    """``count`` files of ``size`` random bytes in ten subfolders of ``root``; returns path -> MD5 (hex)."""
    digests = {}
    for i in range(count):
        rel = f"d{i % 10}/f{i:04d}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5()
        with open(path, "wb") as f:
            for offset in range(0, size, 8 * MiB):
                block = os.urandom(min(8 * MiB, size - offset))
                digest.update(block)
                f.write(block)
        digests[rel] = digest.hexdigest()
    return digests


def md5_tree(root: Path) -> dict[str, str]:
    """Relative path -> MD5 (hex) of every file below ``root``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            out[path.relative_to(root).as_posix()] = hashlib.file_digest(f, "md5").hexdigest()
    return out


def plain_round(azurite, src: Path, digests: dict[str, str], work: Path, tag: str, settings: dict[str, Plain],
                verify: bool = True) -> dict[str, Sample]:
    """One plain upload then download, each in a fresh process with ``settings[direction]``; returns a
    Sample per direction."""
    from testsupport.processes import python_env

    dst = work / f"plain-{tag}"
    out = {}
    for direction in ("up", "down"):
        argv = [sys.executable, __file__, "plain", direction, str(src), str(dst), tag, *settings[direction].argv()]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                env=python_env(BENCH_CONNECTION_STRING=azurite.connection_string()))
        served = cpu_seconds(azurite.proc.pid)
        with RssSampler(proc.pid) as rss:
            stdout, _ = proc.communicate(timeout=900)
        served = cpu_seconds(azurite.proc.pid) - served
        if proc.returncode != 0:
            raise RuntimeError(f"plain client failed ({proc.returncode})")
        got = json.loads(stdout.decode().strip().splitlines()[-1])
        out[direction] = Sample(got["seconds"], got["cpu"], got["idle"], rss.peak, served)
    if verify and md5_tree(dst) != digests:
        raise RuntimeError(f"plain {tag}: the downloaded files differ from the sources")
    return out  # its files stay until the run ends (module docstring)


@dataclass(frozen=True)
class Variant:
    """A sidecar importing its code from the checkout ``source`` (None: this one), with extra seed ``flags``."""

    source: Path | None = None
    flags: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str) -> tuple[str, "Variant"]:
        """``NAME=SRC[,FLAG...]`` -> (name, variant)."""
        name, _, rest = text.partition("=")
        source, *flags = rest.split(",")
        return name, Variant(Path(source).resolve(), tuple(flags))

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.source)} if self.source else {}


def sidecar_round(azurite, src: Path, digests: dict[str, str], work: Path, tag: str,
                  profile: Path | None = None, variant: Variant = Variant()) -> dict[str, Sample]:
    """One parent ``/done`` then child ``/ready`` (processes healthy before the clock); checks that the
    child staged every file with the source's MD5 and that the event meta recorded it; returns a
    Sample per direction."""
    from flows.runtime import child_event_id
    from sidecar.config import ContextConfig, SidecarConfig
    from sidecar.providers.jsonfiles import JsonFileDocumentStore
    from testsupport.azurite import sidecar_args
    from testsupport.processes import SidecarProcess

    rels = sorted(digests)
    parent_id, correlation = f"bench-{tag}", f"corr-{tag}"
    parent_cfg = SidecarConfig(context=ContextConfig(eventid=parent_id, correlationid=correlation, name="parent"))
    child_id = child_event_id(parent_cfg, "batch.json")
    devdir = work / f"dev-{tag}"  # the document store the two share
    (work / f"parent-{tag}").mkdir()
    (work / f"child-{tag}").mkdir()
    parent_args = sidecar_args(azurite, CONTAINER, parent_id, correlation, "parent") + [f"--devdir={devdir}"]
    child_args = sidecar_args(azurite, CONTAINER, child_id, correlation, "child", parent=parent_id) + \
        [f"--devdir={devdir}"]
    parent = SidecarProcess(work / f"parent-{tag}", parent_args + list(variant.flags), env=variant.env())
    child = SidecarProcess(work / f"child-{tag}", child_args + list(variant.flags), env=variant.env())
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
        with Profiler(parent.proc.pid, profile and profile / f"{tag}-done.txt"), RssSampler(parent.proc.pid) as rss:
            started, served, booked = time.perf_counter(), cpu_seconds(azurite.proc.pid), tree_cpu(PREFECT_PROCESSES)
            done = parent.get("/done", timeout=900)
            up = Sample(time.perf_counter() - started, rss.cpu(), rss.idle, 0, cpu_seconds(azurite.proc.pid) - served)
            up.prefect_cpu = tree_cpu(PREFECT_PROCESSES) - booked
        up.peak = rss.peak
        assert done.status_code == 200, done.text
        assert done.json()["events"][0]["eventId"] == child_id
        up.body = done.json()["seconds"]
        with Profiler(child.proc.pid, profile and profile / f"{tag}-ready.txt"), RssSampler(child.proc.pid) as rss:
            started, served, booked = time.perf_counter(), cpu_seconds(azurite.proc.pid), tree_cpu(PREFECT_PROCESSES)
            ready = child.get("/ready", timeout=900)
            down = Sample(time.perf_counter() - started, rss.cpu(), rss.idle, 0, cpu_seconds(azurite.proc.pid) - served)
            down.prefect_cpu = tree_cpu(PREFECT_PROCESSES) - booked
        down.peak = rss.peak
        assert ready.status_code == 200 and ready.json()["files"] == len(rels), ready.text
        down.body = ready.json()["seconds"]
        meta = asyncio.run(JsonFileDocumentStore(devdir / "documents").get_event_meta(child_id))
        recorded = {f.path: f.md5 for f in meta.files}
        if recorded != digests or md5_tree(child.basedir / "in" / "data") != digests:
            raise RuntimeError(f"sidecar {tag}: recorded or staged MD5s differ from the sources")
    finally:
        parent.stop()
        child.stop()
    return {"up": up, "down": down}  # its files stay until the run ends (module docstring)


def mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def run(argv: argparse.Namespace) -> None:
    from testsupport.azurite import run_azurite
    from testsupport.processes import Postgres, start_prefect_server, stop_process_group

    work = Path(tempfile.mkdtemp(prefix="bench-azure-"))
    (work / "prefect").mkdir()
    # On PostgreSQL, as a fleet's server (README, "Running a fleet"): on SQLite the server answered
    # 503 to POST /flow_runs/ while it wrote the previous call's history, and Prefect's client retried
    # 2 s later, a stall of the server's, not the sidecar's, in 2 of 3 rounds of one run.
    postgres = Postgres(work / "pg") if argv.prefect_db == "postgresql" else None
    server, url = start_prefect_server(work / "prefect", database_url=postgres.url if postgres else None)
    os.environ["PREFECT_API_URL"] = url
    PREFECT_PROCESSES[:] = [server.pid] + ([postgres.proc.pid] if postgres else [])
    if argv.profile:
        argv.profile.mkdir(parents=True, exist_ok=True)
    workloads = {name: WORKLOADS[name] for name in (argv.only or WORKLOADS)}
    variants = {"sidecar": Variant(), **dict(Variant.parse(v) for v in argv.variant or ())}
    plains = {"plain": lambda settings: settings}
    if argv.md5_baseline:
        plains["plain+md5"] = lambda settings: {d: cfg.with_whole_md5() for d, cfg in settings.items()}
    if argv.rest_baseline:
        plains["plain-rest"] = lambda settings: {d: cfg.with_rest() for d, cfg in settings.items()}
    approaches = [*plains, *variants]
    results = {name: Results() for name in workloads}
    load_before = os.getloadavg()
    began = time.perf_counter()
    one_gib: dict[str, dict[str, Sample]] = {}
    try:
        with run_azurite() as azurite:
            def measure(approach: str, src: Path, digests: dict[str, str], tag: str, name: str) -> dict[str, Sample]:
                """One round of ``approach`` moving ``src`` up and down, with the plain settings of ``name``."""
                if approach in plains:
                    return plain_round(azurite, src, digests, work, tag, plains[approach](PLAIN[name]))
                return sidecar_round(azurite, src, digests, work, tag, argv.profile, variants[approach])

            sources = {name: (work / f"src-{count}", make_files(work / f"src-{count}", count, size))
                       for name, (count, size) in workloads.items() if argv.rounds > 0 or argv.tune}
            if argv.tune:
                return tune(azurite, sources, work, argv.rounds)
            for r in range(argv.rounds):
                for w, (name, (src, digests)) in enumerate(sources.items()):
                    # plain-rest sends each file in one request: only for files of one chunk.
                    here = [a for a in approaches if a != "plain-rest" or WORKLOADS[name][1] <= PLAIN[name]["up"].chunk]
                    # Rotate which approach goes first, so drift in the machine's load evens out.
                    turn = (r + w) % len(here)
                    for approach in here[turn:] + here[:turn]:
                        tag = f"{r}-{w}-{approach}"
                        got = measure(approach, src, digests, tag, name)
                        for direction, sample in got.items():
                            results[name].add(approach, direction, sample)
                        print(f"round {r + 1} {name:>13} {approach:>10}: " + ", ".join(
                            f"{d} {got[d].seconds:6.2f} s ({got[d].cpu:5.2f} s CPU, Azurite {got[d].azurite_cpu:5.2f} s"
                            + (f", flow body {got[d].body:.2f} s, Prefect {got[d].prefect_cpu:.2f} s"
                               if got[d].body is not None else "") + ")"
                            for d in ("up", "down")) + f", load average {os.getloadavg()[0]:.1f}", flush=True)
            if not argv.skip_1gib:
                big = work / "src-1g"
                digests = make_files(big, 1, GiB)
                rounds: dict[str, list[dict[str, Sample]]] = collections.defaultdict(list)
                # Rotated as the workloads are, so no approach always meets the state Azurite is in at the
                # end of a run (it served the sidecar's last upload of this file with up to 2.4x the CPU).
                large = [a for a in approaches if a != "plain-rest"]
                for r in range(argv.rounds_1gib):
                    turn = r % len(large)
                    for approach in large[turn:] + large[:turn]:
                        tag = f"1g{r}-{approach}"
                        got = measure(approach, big, digests, tag, "1 x 1 GiB")
                        rounds[approach].append(got)
                        print(f"1 GiB round {r + 1} {approach}: up {got['up'].seconds:.2f} s (Azurite "
                              f"{got['up'].azurite_cpu:.1f} s), down {got['down'].seconds:.2f} s, load average "
                              f"{os.getloadavg()[0]:.1f}", flush=True)
                one_gib.update({approach: {d: Sample.median([got[d] for got in samples]) for d in ("up", "down")}
                                for approach, samples in rounds.items()})
    finally:
        stop_process_group(server)
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results, one_gib, argv.rounds, load_before, time.perf_counter() - began, list(variants))
    if argv.profile:
        for approach in variants:
            for call in ("done", "ready"):
                for name, w in [*((n, str(w)) for w, n in enumerate(workloads)), ("1 x 1 GiB", "1g")]:
                    pattern = f"1g-{approach}-{call}.txt" if w == "1g" else f"*-{w}-{approach}-{call}.txt"
                    if files := sorted(argv.profile.glob(pattern)):
                        print(f"\nprofile of {approach} /{call}, {name} ({len(files)} calls):")
                        print("\n".join(profile_summary(files)))


def report(results: dict[str, Results], one_gib: dict[str, dict[str, Sample]], rounds: int,
           load_before: tuple[float, ...], seconds: float, sidecars: list[str]) -> None:
    load_after = os.getloadavg()
    print(f"\nsidecar vs plain azure.storage.blob.aio on Azurite, {rounds} rounds, median [min-max] seconds; "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({seconds:.0f} s)")
    print(f"{'workload':>13} | {'dir':>4} | {'plain s':>19} | {'sidecar s':>19} | {'sidecar/plain':>13} | "
          f"{'CPU s plain, sidecar':>20} | {'Azurite CPU s':>13} | {'flow body s':>11} | "
          "peak RSS MiB plain, sidecar (sidecar rise)")
    verdicts = []  # the goals, judged on what ran: (what, met)
    for name, res in results.items():
        if not res.samples:
            continue
        for direction, sidecar in ((d, v) for d in ("up", "down") for v in sidecars):
            plain, side = res.samples["plain", direction], res.samples[sidecar, direction]
            ratio = statistics.median(s.seconds for s in side) / statistics.median(s.seconds for s in plain)
            if sidecar == "sidecar":
                verdicts.append((f"{name} {direction} {ratio:.2f}x", ratio <= GOAL_RATIO))
            cpu = f"{statistics.median(s.cpu for s in plain):.2f}, {statistics.median(s.cpu for s in side):.2f}"
            served = (f"{statistics.median(s.azurite_cpu for s in plain):.2f}, "
                      f"{statistics.median(s.azurite_cpu for s in side):.2f}")
            body = statistics.median(s.body or 0.0 for s in side)
            label = name if sidecar == "sidecar" else f"{sidecar}: {name}"
            print(f"{label:>13} | {direction:>4} | {spread([s.seconds for s in plain])} | "
                  f"{spread([s.seconds for s in side])} | {ratio:12.2f}x | {cpu:>20} | {served:>13} | {body:11.2f} | "
                  f"{mib(max(s.peak for s in plain))}, "
                  f"{mib(max(s.peak for s in side))} ({mib(max(s.peak - s.idle for s in side))})")
            for baseline in ("plain+md5", "plain-rest"):
                if hashed := res.samples.get((baseline, direction)):
                    print(f"{'':>13} | {direction:>4} | {baseline} {spread([s.seconds for s in hashed])} s, "
                          f"{statistics.median(s.cpu for s in hashed):.2f} s CPU, Azurite "
                          f"{statistics.median(s.azurite_cpu for s in hashed):.2f} s: {sidecar} / {baseline} "
                          f"{statistics.median(s.seconds for s in side) / statistics.median(s.seconds for s in hashed):.2f}x")
    if one_gib:
        for direction, call, sidecar in ((d, c, v) for d, c in (("up", "/done"), ("down", "/ready")) for v in sidecars):
            side, plain = one_gib[sidecar][direction], one_gib["plain"][direction]
            print(f"    1 x 1 GiB | {direction:>4} | {sidecar} {call} {side.seconds:.1f} s ({side.cpu:.1f} s CPU, "
                  f"Azurite {side.azurite_cpu:.1f} s, flow body {side.body or 0:.1f} s), RSS idle "
                  f"{mib(side.idle)} MiB, peak {mib(side.peak)} MiB, rise {mib(side.peak - side.idle)} MiB; plain "
                  f"{plain.seconds:.1f} s ({plain.cpu:.1f} s CPU, Azurite {plain.azurite_cpu:.1f} s), peak RSS {mib(plain.peak)} MiB; sidecar/plain "
                  f"{side.seconds / plain.seconds:.2f}x")
            if sidecar == "sidecar":
                rise = side.peak - side.idle
                verdicts.append((f"1 GiB {direction} RSS rise {mib(rise)} MiB", rise <= GOAL_RISE))
            if hashed := one_gib.get("plain+md5", {}).get(direction):
                print(f"    1 x 1 GiB | {direction:>4} | plain+md5 {hashed.seconds:.1f} s ({hashed.cpu:.1f} s CPU, Azurite "
                      f"{hashed.azurite_cpu:.1f} s): {sidecar} / plain+md5 {side.seconds / hashed.seconds:.2f}x")
        print("    1 x 1 GiB: MD5 of source, event meta and staged file agree")
    print(f"goals (issue 13): sidecar/plain <= {GOAL_RATIO:.2f}x each way for both workloads; sidecar RSS rise "
          f"<= {GOAL_RISE // MiB} MiB for 1 GiB. In this run: " + "; ".join(
              f"{what} {'met' if met else 'NOT met'}" for what, met in verdicts)
          + ("" if one_gib else "; the 1 GiB file was skipped (no RSS verdict)"))


def tune(azurite, sources: dict[str, tuple[Path, dict[str, str]]], work: Path, rounds: int) -> None:
    """The plain client over ``TUNE_GRID``: median seconds per direction, the fastest first."""
    for name, (src, digests) in sources.items():
        rows = []
        for i, cfg in enumerate(TUNE_GRID[name]):
            got = [plain_round(azurite, src, digests, work, f"tune-{name[:4].strip()}-{i}-{r}",
                               {"up": cfg, "down": cfg}, verify=(r == 0)) for r in range(rounds)]
            up = statistics.median(g["up"].seconds for g in got)
            down = statistics.median(g["down"].seconds for g in got)
            rows.append((up, down, cfg))
            print(f"{name}: {cfg}: up {up:.2f} s, down {down:.2f} s", flush=True)
        for d, direction in enumerate(("up", "down")):
            print(f"\n{name} {direction}, fastest first (median of {rounds}):")
            for row in sorted(rows, key=lambda row: row[d])[:5]:
                print(f"  {row[2]}: {row[d]:5.2f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        _, _, direction, source, target, prefix, chunk, per_blob, files, md5, whole_md5, rest = sys.argv
        settings = Plain(int(chunk), int(per_blob), int(files), md5 == "1", whole_md5 == "1", rest == "1")
        print(json.dumps(asyncio.run(plain_transfer(os.environ["BENCH_CONNECTION_STRING"], direction, Path(source),
                                                    Path(target), prefix, settings))))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rounds", type=int, default=3, help="rounds per workload and approach (medians)")
        parser.add_argument("--only", action="append", choices=list(WORKLOADS), help="run only this workload")
        parser.add_argument("--skip-1gib", action="store_true", help="leave out the 1 GiB file")
        parser.add_argument("--rounds-1gib", type=int, default=2,
                            help="rounds of the 1 GiB file, approaches rotating (medians; RSS: the largest rise)")
        parser.add_argument("--prefect-db", choices=["postgresql", "sqlite"], default="postgresql",
                            help="the Prefect server's database (default: PostgreSQL, as a fleet's)")
        parser.add_argument("--md5-baseline", action="store_true",
                            help="also time plain+md5: the plain client hashing every file as the sidecar does")
        parser.add_argument("--rest-baseline", action="store_true",
                            help="also time plain-rest: the plain client sending small files as the sidecar does "
                                 "(Get/Put Blob through the SDK's pipeline; 1000 x 4 KiB only)")
        parser.add_argument("--tune", action="store_true", help="time the plain client over its settings grid")
        parser.add_argument("--profile", type=Path, help="py-spy record each sidecar call into this folder")
        parser.add_argument("--variant", action="append", metavar="NAME=SRC[,FLAG...]",
                            help="one more sidecar: code from checkout SRC, extra seed flags")
        # A SIGTERM unwinds like Ctrl-C, so Azurite, the Prefect server and the temporary files go too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        run(parser.parse_args())
