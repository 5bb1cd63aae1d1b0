"""Fixtures of the user-facing tests: a development-mode sidecar that no module drives, for probes."""

from __future__ import annotations

from typing import Iterator

import pytest

from testsupport.processes import SidecarProcess, dev_args


@pytest.fixture(scope="session")
def idle_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """A healthy development-mode sidecar (shared secret ``testsupport.processes.SECRET``) that stays in
    phase ``new``: tests probe its authentication and health check, never call it successfully."""
    cwd = tmp_path_factory.mktemp("idle-sidecar")
    with SidecarProcess(cwd, dev_args("evt-idle", "corr-idle", "idle")) as sidecar:
        sidecar.wait_healthy()
        yield sidecar
