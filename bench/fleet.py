"""Benchmark: a fleet of module runs against one Prefect server, on SQLite and on PostgreSQL, side by side.

For each database (a ``prefect server start`` on SQLite in a temporary PREFECT_HOME, and one on a
temporary PostgreSQL cluster, both started here) and each N: a wave of N parent module runs at once,
then a wave of N children (``testsupport/fleet.py``: real sidecar processes, development providers, 5
files, 2 events and an insight per run; every sidecar healthy first, then every /ready at once, then
every /done at once; each call made once, no client retries). Prints module runs per minute (the
/ready-to-/done part of both waves), the slowest call, failed calls, the sidecars' start-up, the RSS
of a sidecar (median and largest, after its /done) and of the Prefect server (with its children).

Usage: ``.venv/bin/python bench/fleet.py [--databases=sqlite,postgresql] [N ...]`` (default both
databases, N = 1 10 30 60). Minutes on a quiet machine: N=60 starts 120 sidecar processes per database.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testsupport.fleet import process_tree_rss, run_fleet  # noqa: E402
from testsupport.processes import Postgres, start_prefect_server, stop_process_group  # noqa: E402

MIB = 1024 * 1024
KEPT = Path(os.environ.get("FLEET_BENCH_LOGS", tempfile.gettempdir())) / "bench-fleet-logs"


def measure(database: str, sizes: list[int], root: Path) -> list[dict]:
    postgres = Postgres(root / "pg") if database == "postgresql" else None
    home = root / "home"
    home.mkdir(parents=True)
    proc, url = start_prefect_server(home, database_url=postgres.url if postgres else None)
    rows = []
    try:
        for n in sizes:
            cwd = root / f"fleet-{n}"
            cwd.mkdir()
            started = time.monotonic()
            parents, children = run_fleet(cwd, url, n)
            total = time.monotonic() - started
            rss = parents.rss + children.rss
            runs = parents.runs + children.runs
            working = parents.seconds + children.seconds
            rows.append({
                "database": database, "n": n, "runs": runs,
                "runs_per_minute": 60 * runs / working if working else 0.0,
                "slowest": max(parents.slowest_call, children.slowest_call),
                "failed": len(parents.failures) + len(children.failures),
                "startup": max(parents.startup_seconds, children.startup_seconds),
                "total": total,
                "rss_median": statistics.median(rss) / MIB if rss else 0.0,
                "rss_max": max(rss) / MIB if rss else 0.0,
                "server_rss": process_tree_rss(proc.pid) / MIB,
                "first_failures": (parents.failures + children.failures)[:3],
                "load": os.getloadavg()[0],
            })
            print(_line(rows[-1]), flush=True)
            if rows[-1]["failed"]:
                _keep_logs(cwd, home, KEPT / f"{database}-{n}")
            shutil.rmtree(cwd, ignore_errors=True)
    finally:
        stop_process_group(proc)
        if postgres:
            postgres.stop()
    return rows


def _keep_logs(cwd: Path, home: Path, to: Path) -> None:
    """Copy the sidecars' and the server's logs of a size with failed calls to ``to``, for the post-mortem."""
    to.mkdir(parents=True, exist_ok=True)
    for log in [*cwd.glob("sidecar-*.log"), home / "server.log"]:
        if log.exists():
            shutil.copy(log, to / log.name)
    print(f"    logs of the failed calls kept in {to}", flush=True)


def _line(row: dict) -> str:
    return (f"{row['database']:>10} N={row['n']:<3} {row['runs_per_minute']:7.1f} runs/min  slowest call "
            f"{row['slowest']:6.1f}s  failed {row['failed']:<3} start-up {row['startup']:6.1f}s  "
            f"sidecar RSS {row['rss_median']:5.0f} MiB (max {row['rss_max']:.0f})  server RSS {row['server_rss']:5.0f} MiB  "
            f"wall {row['total']:6.1f}s  load {row['load']:.1f}")


def main() -> None:
    databases = ["sqlite", "postgresql"]
    args = sys.argv[1:]
    for arg in [a for a in args if a.startswith("--databases=")]:
        databases = arg.split("=", 1)[1].split(",")
        args.remove(arg)
        unknown = [d for d in databases if d not in ("sqlite", "postgresql")]
        if unknown:
            sys.exit(f"bench/fleet.py: --databases takes sqlite and/or postgresql, not {', '.join(unknown)}")
    sizes = [int(a) for a in args] or [1, 10, 30, 60]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for database in databases:
            rows += measure(database, sizes, Path(tmp) / database)
    if len(databases) < 2:
        return
    print("\nmodule runs per minute, PostgreSQL / SQLite:")
    for n in sizes:
        by_db = {r["database"]: r for r in rows if r["n"] == n}
        sqlite, pg = by_db["sqlite"], by_db["postgresql"]
        ratio = pg["runs_per_minute"] / sqlite["runs_per_minute"] if sqlite["runs_per_minute"] else float("nan")
        print(f"  N={n:<3} {ratio:5.2f}x  (failed calls: SQLite {sqlite['failed']}, PostgreSQL {pg['failed']})")
        for row in (sqlite, pg):
            for failure in row["first_failures"]:
                print(f"    {row['database']}: {failure}")


if __name__ == "__main__":
    main()
