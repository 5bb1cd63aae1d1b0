"""Launchers: how a module run's attempt is started. The dispatcher depends on :class:`Launcher` only.

- :class:`LocalLauncher` (the default) runs the sidecar and the module's command as processes of this
  machine (:func:`dispatcher.processes.run_attempt`).
- :class:`dispatcher.workpool.WorkPoolLauncher` hands each attempt to Prefect as a deployment run on a
  work pool, so Prefect workers (process workers, or Kubernetes/Docker work pools elsewhere) run it.
"""

from __future__ import annotations

from typing import Protocol

from dispatcher.processes import ModuleRun, Outcome, run_attempt


class Launcher(Protocol):
    """Starts attempts of module runs and reports how each ended."""

    name: str

    async def prepare(self) -> None:
        """Called once before the first attempt of a graph run (e.g. to register a deployment)."""

    async def launch(self, run: ModuleRun) -> Outcome:
        """Run one attempt to its end and return its :class:`Outcome`; never raises for a failed
        attempt (only for a fault of the launcher itself). Cancelled: stops what it started."""


class LocalLauncher:
    """Runs every attempt as local processes (a sidecar and the module's command)."""

    name = "local"

    async def prepare(self) -> None:
        pass

    async def launch(self, run: ModuleRun) -> Outcome:
        return await run_attempt(run)
