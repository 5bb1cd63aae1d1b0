"""Fixtures of the restart tests: the production stack (``stack`` in ``tests/conftest.py``) with a topic
whose duplicate detection is off, and the restartable sidecars a test starts
(``testsupport.processes.RestartableSidecar``: frozen at a named step of /done, killed there and started
again with the same flags on the same port)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest

from testsupport.processes import RestartableSidecar
from testsupport.servicebus import unique
from testsupport.stack import Stack


@pytest.fixture(scope="module")
def nodedup(stack: Stack) -> Stack:
    """The stack with its own topic, created without duplicate detection (every delivery counts)."""
    topic = stack.peer.create_topic(unique("restart"), [stack.subscription], duplicate_detection=False)
    return dataclasses.replace(stack, topic=topic.name)


@pytest.fixture
def sidecars() -> Iterator[list[RestartableSidecar]]:
    """Sidecars a test starts; each is stopped (or killed) at the end."""
    started: list[RestartableSidecar] = []
    yield started
    for sidecar in started:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.proc.wait()
