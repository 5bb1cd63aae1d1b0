"""Tiny modules for the offline Dispatcher's tests: ``python modules.py ROLE``.

- ``source``: publishes ``COUNT`` (3) ``item`` events, each with one file of its own.
- ``worker``: copies its one input file on and publishes one ``checked`` event; appends ``start``/``end``
  lines (event id, monotonic seconds) to ``$TRACE``; for the event with ``index`` = ``$FAIL_INDEX`` it
  fails its first attempt (exit 3 after /ready, before /done: a marker file remembers the attempt).
- ``broken``: never calls the sidecar: its first attempt exits 4, every later one crashes (SIGKILL).
- ``lazy``: stages its inputs and exits 0 without calling /done.
- ``hang``: stages inputs, writes its pid (and its child's) to ``$PIDS``, then never ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ion_sidecar_client import SidecarClient


def source(client: SidecarClient) -> None:
    client.ready()
    for i in range(int(os.environ.get("COUNT", "3"))):
        path = f"items/item{i}.bin"
        client.write_file(path, bytes(range(256)) * (i + 1) + f"item {i}\n".encode())
        client.write_event(f"item{i}", "item", [path], index=str(i), path=path)
    client.done()


def worker(client: SidecarClient) -> None:
    trace = Path(os.environ["TRACE"])
    client.ready()
    meta = client.input_meta()
    with open(trace, "a") as out:
        out.write(f"start {meta['index']} {time.monotonic()}\n")
    time.sleep(float(os.environ.get("WORK_SECONDS", "1")))
    marker = trace.with_name(f"failed-{meta['index']}")
    if meta["index"] == os.environ.get("FAIL_INDEX") and not marker.exists():
        marker.touch()
        with open(trace, "a") as out:
            out.write(f"end {meta['index']} {time.monotonic()}\n")
        print(f"worker: failing the first attempt of item {meta['index']} on purpose", flush=True)
        raise SystemExit(3)
    data = (client.layout.in_data / meta["path"]).read_bytes()
    client.write_file(meta["path"], data)
    client.write_event("checked", "checked", [meta["path"]], index=meta["index"])
    with open(trace, "a") as out:
        out.write(f"end {meta['index']} {time.monotonic()}\n")
    client.done()


def broken(client: SidecarClient) -> None:
    print("broken: the input cannot be read, giving up", flush=True)
    marker = Path(os.environ["TRACE"]).with_name("broken-once")
    if not marker.exists():
        marker.touch()
        raise SystemExit(4)
    os.kill(os.getpid(), signal.SIGKILL)


def lazy(client: SidecarClient) -> None:
    client.ready()
    client.write_event("forgotten", "item", index="9", path="none")  # never committed


def hang(client: SidecarClient) -> None:
    client.ready()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    Path(os.environ["PIDS"]).write_text(f"{os.getpid()} {child.pid}\n")
    print("hang: waiting for ever", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    {"source": source, "worker": worker, "broken": broken, "lazy": lazy, "hang": hang}[sys.argv[1]](SidecarClient())
