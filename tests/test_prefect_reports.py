"""Reports of final states the sidecar makes itself (after an outage, or for its predecessor), against
the session's real Prefect server: a flow run the API does not know (its database was reset, another
server answers at the URL) is dropped and does not hold back the others, and a Crashed state Prefect's
engine left on a flow run whose body the run record knows finished is replaced by the known one."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from sidecar.orchestration import PrefectApi
from sidecar.runstate import RunStore


def test_reports_skip_unknown_flow_runs_and_replace_a_crash_the_record_knows_better(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Failed

    @flow(name="sidecar-report-probe")
    async def probe() -> None:
        pass

    async def scenario() -> None:
        async with get_client() as client:
            pending = await client.create_flow_run(probe)  # Pending, as a run whose report was lost
            crashed = await client.create_flow_run(probe, state=Crashed(message="cancelled at exit"))
            failed = await client.create_flow_run(probe, state=Failed(message="the body failed"))
        store = RunStore(tmp_path, "evt-reports", "mod")
        store.save(unreported={str(uuid.uuid4()): {"type": "COMPLETED", "message": "another server's"},
                               str(crashed.id): {"type": "COMPLETED", "message": "committed"},
                               str(failed.id): {"type": "COMPLETED", "message": "not ours to change"}})
        api = PrefectApi(timeout=5, ledger=store)
        api._inherit()
        api._pending = {str(uuid.uuid4()): Completed(message="gone"), str(pending.id): Completed(message="done")}
        await api._flush_reports()
        assert api._pending == {} and api._inherited == {}
        assert store.refresh().unreported == {}
        async with get_client() as client:
            assert (await client.read_flow_run(pending.id)).state.is_completed()
            assert (await client.read_flow_run(crashed.id)).state.is_completed()
            assert (await client.read_flow_run(failed.id)).state.is_failed()  # a final state the API had

    asyncio.run(scenario())
