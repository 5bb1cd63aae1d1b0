"""Hostile inputs beyond the corpus's one-file cases, found by a hostile trial (6), each through the app
against the development providers and the real ones (Azurite, nx-27017, the AMQP 1.0 peer):

- a tree under ``out/data`` a thousand folders deep: ``/done``'s walk raised RecursionError (a 500), and
  so did every later ``/ready`` on that volume, whose clean-up (``shutil.rmtree``) recurses once per level.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from testsupport.hostile import KINDS, Plane, nest, reset_outputs
from testsupport.processes import SECRET

H = {"secret": SECRET}


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_a_tree_too_deep_to_walk_is_refused_and_the_next_run_still_starts(plane: Plane) -> None:
    """/done answers 400 naming the folder where names get too long, commits nothing; a fresh run on the
    same volume empties it on /ready (before: RecursionError, a 500, on both, for good)."""
    runtime = plane.runtime("hostile-deep")
    out = runtime.layout.basedir / "out"
    try:
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
            assert client.get("/ready", headers=H).status_code == 200
            reset_outputs(out)
            nest(out / "data", ["d"] * 1100)
            before = plane.committed("hostile-deep")
            answer = client.get("/done", headers=H)
            body = answer.json()
            assert answer.status_code == 400, body
            assert body["message"].startswith("out/data/" + "d/" * 253 + "d: is a folder no file below which can be "
                                               "committed: a name below it has 255 path segments"), body
            assert plane.committed("hostile-deep") == before
        # The module stops there; the next run on this volume (another event) starts from an empty out/.
        rerun = plane.runtime("hostile-deep-next")
        with TestClient(create_app(rerun), raise_server_exceptions=False) as client:
            answer = client.get("/ready", headers=H)
            assert answer.status_code == 200, answer.text
        assert sorted(os.listdir(out)) == ["data", "events"] and not os.listdir(out / "data")
    finally:  # pytest's own clean-up recurses once per level too
        subprocess.run(["rm", "-rf", str(out)], check=True)
