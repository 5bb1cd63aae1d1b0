"""Fixtures of the restart tests: the production stack (Azurite, nx-27017, the AMQP peer) with a topic
whose duplicate detection is off, and a sidecar process that can be frozen at a named step of /done
(``sidecar/crashpoints.py``), killed there and started again with the same flags on the same port."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from tests.production.conftest import Stack, stack  # noqa: F401 - the module-scoped stack fixture
from tests.servicebus.conftest import unique
from tests.support import SECRET, dies_with_parent, free_port, python_env, wait_http


@pytest.fixture(scope="module")
def nodedup(stack: Stack) -> Stack:  # noqa: F811
    """The stack with its own topic, created without duplicate detection (every delivery counts)."""
    topic = stack.peer.create_topic(unique("restart"), [stack.subscription], duplicate_detection=False)
    return dataclasses.replace(stack, topic=topic.name)


class Sidecar:
    """``python -m sidecar`` with ``args`` on a fixed port, started again by :meth:`restart` with the
    same command line, as the kubelet restarts a container. Log lines of every start go to ``log``."""

    def __init__(self, workdir: Path, args: list[str], port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.basedir = workdir / "ion"
        self.argv = [sys.executable, "-m", "sidecar", f"--serverport={self.port}", f"--basedir={self.basedir}",
                     f"--sharedsecret={SECRET}", *args]
        self.log = workdir / "sidecar.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, pause_at: str | None = None, nofile: int | None = None, **env: str) -> "Sidecar":
        """Start the process; with ``pause_at`` it stops itself (SIGSTOP) at that crash point; with
        ``nofile`` its open-file limit (soft and hard, as ``ulimit -n``) is that many descriptors."""
        extra = dict(env)
        if pause_at:
            extra["SIDECAR_TEST_PAUSE_AT"] = pause_at
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts} (pause at {pause_at})\n".encode())
            limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=python_env(**extra), stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=dies_with_parent(then=limit))
        return self

    def wait_paused(self, timeout: float = 120) -> None:
        """Wait until the process froze itself at its crash point."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode} before its pause:\n{self.output()}")
            if psutil.Process(self.proc.pid).status() == psutil.STATUS_STOPPED:
                return
            time.sleep(0.05)
        raise AssertionError(f"sidecar never reached its pause point:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or an eviction does."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"sidecar did not stop within {timeout} s of SIGTERM:\n{self.output()}")

    def wait_healthy(self, timeout: float = 120) -> None:
        try:
            wait_http(f"{self.url}/healthz", timeout, proc=self.proc)
        except Exception:
            raise AssertionError(f"sidecar did not become healthy:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    """Sidecars a test starts; each is stopped (or killed) at the end."""
    started: list[Sidecar] = []
    yield started
    for sidecar in started:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.proc.wait()
