"""``ion-offline``: run a graph of modules on this machine with no external service.

    ion-offline GRAPH.yaml [key=value Hydra overrides ...] [--files DIR] [--data KEY=VALUE ...]
                [--correlationid ID] [--rundir DIR] [--launcher local|workpool] [--workpool NAME]

Exit codes: 0 every module run completed; 1 some event went to the dead-letter folder; 2 bad command
line or graph file; 130 stopped by Ctrl-C (every process it started is stopped first).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

EXIT_DEAD_LETTER = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ion-offline", description="Run a graph of modules offline: a local "
                                "Dispatcher, one development-mode sidecar per module run, no external service.")
    p.add_argument("graph", help="the graph file (YAML, composed with Hydra)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the graph file, e.g. modules.hash.concurrency=4")
    p.add_argument("--files", help="a folder whose files the initial event carries (overrides initial.files)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="a pair of the initial event (repeatable; added to initial.data)")
    p.add_argument("--correlationid", help="the graph run's correlation id (default: a new one)")
    p.add_argument("--rundir", help="the graph run's folder (default: .ion-offline/{correlationid})")
    p.add_argument("--launcher", choices=("local", "workpool"), default="local",
                   help="local processes (default) or Prefect deployment runs on a work pool")
    p.add_argument("--workpool", default="ion-offline", help="the work pool of --launcher=workpool")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ion-offline`` console script."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API request otherwise
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    data: dict[str, str] = {}
    for pair in args.data:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _usage(f"--data {pair!r}: expected KEY=VALUE")
        data[key] = value

    from dispatcher.graph import GraphError, load_graph

    try:
        graph = load_graph(args.graph, args.overrides)
    except GraphError as exc:
        _usage(str(exc))
    files = Path(args.files).resolve() if args.files else (
        graph.resolve(graph.config.initial.files) if graph.config.initial.files else None)
    if files is not None and not files.is_dir():
        _usage(f"--files / initial.files: {files} is not a folder")
    correlationid = args.correlationid or f"offline-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    rundir = Path(args.rundir or Path(".ion-offline") / correlationid).resolve()
    rundir.mkdir(parents=True, exist_ok=True)

    server = None
    if not os.environ.get("PREFECT_API_URL"):
        from dispatcher.server import start_prefect_server

        print(f"ion-offline: starting a Prefect server (set PREFECT_API_URL to use yours); log {rundir / 'prefect-server.log'}",
              flush=True)
        server, os.environ["PREFECT_API_URL"] = start_prefect_server(rundir / "prefect-server.log")
    print(f"ion-offline: graph run {correlationid} in {rundir}; Prefect API {os.environ['PREFECT_API_URL']}", flush=True)
    started = time.monotonic()
    try:
        records = asyncio.run(_run(graph, rundir, correlationid, args, files, {**graph.config.initial.data, **data}))
    except KeyboardInterrupt:
        print("ion-offline: interrupted; every process it started is stopped", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        from dispatcher.processes import kill_all_groups

        kill_all_groups()
        if server is not None:
            _stop(server)
    from dispatcher.dispatch import DEAD_LETTER, summary_table

    print(summary_table(records))
    dead = [r for r in records if r.status == DEAD_LETTER]
    print(f"ion-offline: {len(records)} module runs, {len(dead)} dead letters, {time.monotonic() - started:.1f} s; "
          f"summary in {rundir / 'summary.json'}" + (f", dead letters in {rundir / 'deadletter'}" if dead else ""))
    raise SystemExit(EXIT_DEAD_LETTER if dead else 0)


async def _run(graph, rundir: Path, correlationid: str, args: argparse.Namespace, files: Path | None,
               data: dict[str, str]):
    from dispatcher.dispatch import Dispatcher, graph_run
    from dispatcher.launchers import LocalLauncher

    if args.launcher == "workpool":
        from dispatcher.workpool import WorkPoolLauncher

        launcher = WorkPoolLauncher(args.workpool)
    else:
        launcher = LocalLauncher()
    dispatcher = Dispatcher(graph, rundir, correlationid, launcher)
    try:
        await graph_run(dispatcher, correlationid, str(files) if files else None, data)
    finally:
        await _drain_prefect()
    return list(dispatcher.records.values())


async def _drain_prefect(timeout: float = 15.0) -> None:
    # Prefect sends log lines and run events from background queues; send them while the server that
    # this command may have started still listens.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            await asyncio.wait_for(worker.drain_all(timeout=timeout), timeout)
        except Exception as exc:  # noqa: BLE001 - on the way out: report, never block the exit
            logging.getLogger("ion-offline").warning("could not send the last %s items to Prefect: %s",
                                                     worker.__name__, exc)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _usage(message: str) -> None:
    print(f"ion-offline: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":
    main()
