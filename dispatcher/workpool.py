"""The work-pool launcher: each attempt of a module run becomes a Prefect deployment run on a work pool.

The deployment ``module-run/{name}`` runs :func:`module_run_flow`, which does on the worker's machine
what :class:`~dispatcher.launchers.LocalLauncher` does here (:func:`~dispatcher.processes.run_attempt`:
a development-mode sidecar and the module's command). Its entry point is a module path
(``dispatcher.workpool.module_run_flow``), so any worker whose environment has this package installed
runs it: a ``prefect worker start --type process`` beside the dispatcher, or a Kubernetes or Docker work
pool whose job image is this project's (``deploy/workpool/`` holds the base job templates). The deployment
run is created as a child of the module run's task run, so the Prefect UI shows it under the graph run.

Offline, the worker must see the graph run's folder at the same path (the same machine, or a shared
volume): the sidecars of a graph run share its ``.dev/`` data plane and the dispatcher reads the
published events there.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from prefect import flow

from dispatcher.processes import ModuleRun, ModuleRunFailed, Outcome, run_attempt, tail

DEPLOYMENT = "ion-offline"


@flow(name="module-run", persist_result=False, log_prints=False)
async def module_run_flow(run: dict) -> dict:
    """One attempt of a module run on a worker.

    Args:
        run: a :class:`~dispatcher.processes.ModuleRun` as a dict.

    Returns:
        The :class:`~dispatcher.processes.Outcome` as a dict.

    Raises:
        ModuleRunFailed: the attempt failed; the message (the flow run's state message) says why.
    """
    outcome = await run_attempt(ModuleRun(**run))
    if not outcome.ok:
        raise ModuleRunFailed(outcome.reason)
    return outcome.as_dict()


class WorkPoolMissing(ValueError):
    """``--workpool`` names no work pool in the Prefect API the dispatcher reports to."""


class WorkPoolLauncher:
    """Hands every attempt to Prefect as a run of deployment ``module-run/{deployment}`` on ``pool``.

    Args:
        pool: the work pool's name (``prefect work-pool create --type process NAME`` creates one).
        deployment: the deployment's name; created or updated by :meth:`prepare`.
        pickup_seconds: how long a run may wait for a worker and start up, seconds, on top of the
            module's time-out; past both the run is cancelled and the attempt fails.
        poll_seconds: how often the run's state is read, seconds.
    """

    name = "workpool"

    def __init__(self, pool: str, deployment: str = DEPLOYMENT, pickup_seconds: float = 300.0,
                 poll_seconds: float = 1.0):
        self.pool = pool
        self.deployment = deployment
        self.pickup_seconds = pickup_seconds
        self.poll_seconds = poll_seconds

    async def prepare(self) -> None:
        """Create (or update) the deployment on the work pool.

        Raises:
            WorkPoolMissing: the work pool does not exist in this Prefect API (the message says where, and
                how to create it there).
        """
        from prefect.client.orchestration import get_client
        from prefect.deployments.runner import EntrypointType
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            try:
                await client.read_work_pool(self.pool)
            except ObjectNotFound:
                url = client.api_url
                raise WorkPoolMissing(
                    f"work pool '{self.pool}' does not exist in the Prefect API at {url}; create it there first "
                    f"(PREFECT_API_URL={url} .venv/bin/prefect work-pool create {self.pool} --type process "
                    "--base-job-template deploy/workpool/process.json) and start a worker on it") from None
        await module_run_flow.adeploy(name=self.deployment, work_pool_name=self.pool, build=False, push=False,
                                      entrypoint_type=EntrypointType.MODULE_PATH, print_next_steps=False)

    async def launch(self, run: ModuleRun) -> Outcome:
        """Run the attempt as a deployment run and wait for its final state. A run that outlives the
        module's time-out plus ``pickup_seconds``, or whose wait is cancelled (Ctrl-C), is cancelled
        in Prefect, which makes its worker stop the flow run's processes."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        started = asyncio.get_running_loop().time()
        # timeout=0: create the run and return; waiting here lets a cancelled wait cancel the run.
        flow_run = await run_deployment(
            f"module-run/{self.deployment}", parameters={"run": asdict(run)},
            flow_run_name=f"{run.module}-{run.eventid}-attempt-{run.attempt}",
            tags=[f"correlation:{run.correlationid}", f"module:{run.module}"], timeout=0, as_subflow=True)
        limit = run.timeoutseconds + self.pickup_seconds
        deadline = asyncio.get_running_loop().time() + limit
        try:
            async with get_client() as client:
                while True:
                    flow_run = await client.read_flow_run(flow_run.id)
                    state = flow_run.state
                    if state is not None and state.is_final():
                        break
                    if asyncio.get_running_loop().time() > deadline:
                        await self._cancel(flow_run.id)
                        return Outcome(False, f"deployment run {flow_run.name} did not finish within {limit:g} s; "
                                              "cancelled", log=tail(run.module_log))
                    await asyncio.sleep(self.poll_seconds)
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(flow_run.id))
            raise
        seconds = round(asyncio.get_running_loop().time() - started, 3)
        if state.is_completed():
            return Outcome(True, exitcode=0, seconds=seconds)
        reason = state.message or state.name
        return Outcome(False, f"deployment run {flow_run.name} {state.name}: {reason}", seconds=seconds,
                       log=tail(run.module_log))

    @staticmethod
    async def _cancel(flow_run_id) -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
