"""``ion-offline``: run a graph of modules on this machine with no external service.

    ion-offline GRAPH.yaml [key=value Hydra overrides ...] [--files DIR] [--data KEY=VALUE ...]
                [--correlationid ID] [--rundir DIR] [--launcher local|workpool] [--workpool NAME]

Exit codes: 0 every module run completed; 1 some event went to the dead-letter folder; 2 bad command
line or graph file; 130 stopped by Ctrl-C (every process it started is stopped first).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
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
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a graph run is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
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
    if (rundir / ".dev").exists():
        _usage(f"{rundir} already holds a graph run (its .dev/); give another --rundir or --correlationid")
    rundir.mkdir(parents=True, exist_ok=True)

    devserver = None
    if not os.environ.get("PREFECT_API_URL"):
        devserver, os.environ["PREFECT_API_URL"] = _attach_dev_server(Path(".ion-offline", "prefect").resolve())
    print(f"ion-offline: graph run {correlationid} in {rundir}; Prefect API {os.environ['PREFECT_API_URL']}", flush=True)
    started = time.monotonic()
    interrupted = False
    refused = None
    try:
        records = asyncio.run(_run(graph, rundir, correlationid, args, files, {**graph.config.initial.data, **data}))
    except KeyboardInterrupt:
        interrupted = True
    except ValueError as exc:
        from dispatcher.workpool import WorkPoolMissing

        if not isinstance(exc, WorkPoolMissing):
            raise
        refused = str(exc)
    finally:
        from dispatcher.processes import kill_all_groups
        from sidecar.orchestration import drain_workers_now

        kill_all_groups()
        # The run history's last log lines and events go out while the server is surely up: after the
        # detach, a development server stops with its last user, and Prefect's exit drain has no bound.
        drain_workers_now()
        if devserver is not None:
            devserver.detach()  # its supervisor stops the server once no sidecar uses it either
    if refused is not None:
        _usage(refused)
    if interrupted:
        from sidecar.serving import EXIT_SECONDS, exit_within

        print("ion-offline: interrupted; every process it started is stopped", file=sys.stderr, flush=True)
        exit_within(EXIT_SECONDS, EXIT_INTERRUPTED)
        raise SystemExit(EXIT_INTERRUPTED)
    from dispatcher.dispatch import DEAD_LETTER, summary_table

    print(summary_table(records))
    dead = [r for r in records if r.status == DEAD_LETTER]
    print(f"ion-offline: {len(records)} module runs, {len(dead)} dead letters, {time.monotonic() - started:.1f} s; "
          f"summary in {rundir / 'summary.json'}" + (f", dead letters in {rundir / 'deadletter'}" if dead else ""))
    raise SystemExit(EXIT_DEAD_LETTER if dead else 0)


async def _run(graph, rundir: Path, correlationid: str, args: argparse.Namespace, files: Path | None,
               data: dict[str, str]):
    from prefect import tags

    from dispatcher.dispatch import Dispatcher, graph_run
    from dispatcher.launchers import LocalLauncher
    from sidecar.orchestration import drain_workers

    if args.launcher == "workpool":
        from dispatcher.workpool import WorkPoolLauncher

        launcher = WorkPoolLauncher(args.workpool)
    else:
        launcher = LocalLauncher()
    # Before the graph's flow run and its seed: a launcher that cannot start runs (a work pool missing from
    # this API) is one line, not a failed flow run whose traceback Prefect logs after the event was seeded.
    await launcher.prepare()
    dispatcher = Dispatcher(graph, rundir, correlationid, launcher)
    try:
        # The tag the sidecars put on their flow runs (flows/history.py): one filter shows the graph run.
        with tags(f"correlation:{correlationid}"):
            await graph_run(dispatcher, correlationid, str(files) if files else None, data)
    finally:
        await drain_workers(15.0)  # while the server this command may have started still listens
    return list(dispatcher.records.values())


def _attach_dev_server(state_dir: Path, timeout: float = 180.0):
    """Join the supervised development Prefect server of ``state_dir`` (``sidecar/devserver.py``: one per
    folder, shared, restarted if it dies, stopped once nobody uses it), starting it if none runs, and
    wait until its API answers. Every graph run started in one working directory reports to it, so its
    UI shows them all; its database is ``state_dir/prefect.db``. Returns the membership and the API URL.
    """
    import httpx

    from sidecar.devserver import DevServerClient

    client = DevServerClient(state_dir)
    info = client.attach(timeout)
    print(f"ion-offline: Prefect UI {info['ui']} (development server of {state_dir}, while a graph runs)", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{info['url']}/health", timeout=5).status_code == 200:
                return client, info["url"]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            client.detach()
            _usage(f"the Prefect development server did not answer within {timeout:g} s (see {state_dir / 'server.log'})")
        time.sleep(0.25)


def _usage(message: str) -> None:
    print(f"ion-offline: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":
    main()
