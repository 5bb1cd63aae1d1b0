"""The shared secret's rule and ``HEAD /healthz`` over real HTTP (a sidecar process under uvicorn).

The secret travels as its UTF-8 bytes, the same in the server and in ``ion_sidecar_client``; a secret HTTP
cannot carry stops start-up with one line (``sidecar/sharedsecret.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ion_sidecar_client import SidecarClient

from testsupport.processes import SidecarProcess, dev_args, python_env

SECRET = "pässwörd-€-漢字-😀"


def test_non_ascii_secret_matches_its_utf8_bytes_and_head_healthz_needs_none(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, dev_args("evt-secret", "corr-secret", "mod"), secret=SECRET) as sidecar:
        sidecar.wait_healthy()
        head = httpx.head(f"{sidecar.url}/healthz", timeout=30)
        assert head.status_code == 200 and head.content == b""
        assert httpx.get(f"{sidecar.url}/healthz", timeout=30).status_code == 200
        wrong = [SECRET.encode("utf-8").decode("latin-1").encode("utf-8"),  # UTF-8 encoded twice
                 "pässwörd".encode("latin-1"), SECRET.encode("utf-8")[:-1], b""]
        for value in wrong:
            answer = httpx.get(f"{sidecar.url}/ready", headers={"secret": value}, timeout=30)
            assert answer.status_code == 401 and answer.json()["statusCode"] == 401, value
        client = SidecarClient(url=sidecar.url, secret=SECRET, basedir=sidecar.basedir)
        assert client.ready(retry_seconds=5)["files"] == 0
        assert httpx.get(f"{sidecar.url}/ready", headers={"secret": SECRET.encode("utf-8")}, timeout=30).status_code == 200


@pytest.mark.parametrize("secret", [" padded ", "tab\t", "a\nb"])
def test_a_secret_http_cannot_carry_is_refused_by_client_and_server(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ValueError, match="shared secret") as err:
        SidecarClient(url="http://unused", secret=secret, basedir=tmp_path)
    assert secret not in str(err.value)
    if secret != " padded ":
        return  # one process is enough to show the server's side
    env = python_env(SHARED_SECRET=secret)
    result = subprocess.run([sys.executable, "-m", "sidecar", "--context.eventid=e", "--context.correlationid=c",
                             "--development=true", "--context.name=m-${oc.env:HOME}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "shared secret" in lines[0] and "blank" in lines[0], result.stderr
    assert secret not in result.stderr

