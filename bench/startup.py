"""Benchmark: a sidecar's start-up (seconds and CPU seconds to ``/healthz`` 200) and RSS, with the
installed packages' bytecode and without it, side by side.

Without: every installed package is compiled from source at each start, as it was when nothing
wrote their bytecode (``PYTHONDONTWRITEBYTECODE=1`` on this machine, and ``uv sync`` writes none by
default): here ``PYTHONPYCACHEPREFIX`` points at a folder holding the standard library's bytecode
only (written here first), and nothing more is written. With: the ``__pycache__`` folders
``scripts/setup`` writes.
Rounds alternate the two. Each start: a development-mode sidecar against one Prefect server (SQLite)
started here; measured are the wall time and the process's CPU time (user + system: what a fleet of
sidecars starting at once on one machine shares) until ``/healthz`` answers 200, the RSS then, and
the RSS after one ``/ready`` and one ``/done`` (5 files, 1 event).

Usage: ``.venv/bin/python bench/startup.py [ROUNDS]`` (default 5).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testsupport.processes import SidecarProcess, dev_args, start_prefect_server, stop_process_group, wait_http  # noqa: E402

MIB = 1024 * 1024


def one_start(cwd: Path, api_url: str, env: dict[str, str], label: str) -> dict[str, float]:
    """Start one sidecar in ``cwd``; returns seconds and CPU seconds to healthy and RSS (MiB)."""
    cwd.mkdir(parents=True)
    started = time.monotonic()
    sidecar = SidecarProcess(cwd, dev_args(f"evt-{label}", "corr-startup", "mod"),
                             env={"PREFECT_API_URL": api_url, **env})
    try:
        wait_http(f"{sidecar.url}/healthz", 300, proc=sidecar.proc)
        seconds = time.monotonic() - started
        proc = psutil.Process(sidecar.proc.pid)
        cpu = proc.cpu_times()
        rss_healthy = proc.memory_info().rss
        assert sidecar.get("/ready").status_code == 200, sidecar.output()
        data = sidecar.basedir / "out" / "data"
        data.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            (data / f"f{i}.txt").write_text("x" * 10_000)
        events = sidecar.basedir / "out" / "events"
        events.mkdir(parents=True, exist_ok=True)
        (events / "e.json").write_text('[{"key": "eventType", "value": "file_discovered"}]')
        done = sidecar.get("/done")
        assert done.status_code == 200, done.text
        rss_done = proc.memory_info().rss
    finally:
        sidecar.stop()
    return {"seconds": seconds, "cpu": cpu.user + cpu.system, "rss_healthy": rss_healthy / MIB,
            "rss_done": rss_done / MIB}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    results: dict[str, list[dict[str, float]]] = {"without bytecode": [], "with bytecode": []}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        empty = root / "no-bytecode"
        empty.mkdir()
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-x", "site-packages", str(stdlib)],
                       env=dict(os.environ, PYTHONPYCACHEPREFIX=str(empty)), capture_output=True)
        written = sum(1 for _ in empty.rglob("*.pyc"))
        home = root / "home"
        home.mkdir()
        server, api_url = start_prefect_server(home)
        try:
            for r in range(rounds):
                for label, env in (("without bytecode", {"PYTHONPYCACHEPREFIX": str(empty),
                                                         "PYTHONDONTWRITEBYTECODE": "1"}),
                                   ("with bytecode", {})):
                    row = one_start(root / f"{r}-{label.split()[0]}", api_url, env, f"{r}-{label.split()[0]}")
                    results[label].append(row)
                    loads.append(os.getloadavg()[0])
                    print(f"round {r + 1} {label:>16}: healthy after {row['seconds']:5.1f}s, "
                          f"{row['cpu']:5.1f} CPU s, RSS {row['rss_healthy']:5.1f} MiB, "
                          f"after /done {row['rss_done']:5.1f} MiB", flush=True)
            assert sum(1 for _ in empty.rglob("*.pyc")) == written, "bytecode was written where there should be none"
        finally:
            stop_process_group(server)
    print(f"\nmedians of {rounds} rounds ({os.cpu_count()} CPUs, load average {min(loads):.1f} to {max(loads):.1f}):")
    medians = {label: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for label, rows in results.items()}
    for label, m in medians.items():
        print(f"  {label:>16}: healthy after {m['seconds']:5.1f}s, {m['cpu']:5.1f} CPU s, "
              f"RSS {m['rss_healthy']:5.1f} MiB, after /done {m['rss_done']:5.1f} MiB")
    before, after = medians["without bytecode"], medians["with bytecode"]
    print(f"  with / without: wall {after['seconds'] / before['seconds']:.2f}x, CPU {after['cpu'] / before['cpu']:.2f}x, "
          f"RSS {after['rss_healthy'] / before['rss_healthy']:.2f}x")


if __name__ == "__main__":
    main()
