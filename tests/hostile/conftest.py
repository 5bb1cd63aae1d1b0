"""The provider sets the hostile corpus runs against (``testsupport.hostile.Plane``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testsupport.hostile import Plane


@pytest.fixture
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Plane:
    """``request.param`` ("dev" or "real"): the development providers under ``tmp_path/.dev``, or the
    module's real stack (Azurite, nx-27017, the AMQP peer)."""
    kind = request.param
    return Plane(kind, tmp_path, request.getfixturevalue("stack") if kind == "real" else None)
