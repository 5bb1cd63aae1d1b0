"""How ``/ready`` stages a module's inputs: no sidecar-owned name shares a namespace with the inputs'
names, nothing is deleted or written through a link, and a child whose event meta is missing is told
so instead of running on no inputs (README: /ready, The folder contract, Errors). Development and real
providers (Azurite, nx-27017, the AMQP peer), in process as ``tests/test_api.py`` drives the app; the
restart case kills a real sidecar process mid-download."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from flows.ready import staged_file
from flows.runtime import Runtime
from sidecar.api import create_app
from sidecar.cli import compose_config
from sidecar.dataplane.blobs import partial_path
from testsupport.processes import SECRET, RestartableSidecar
from testsupport.stack import Stack, seed_args

H = {"secret": SECRET}
SMALL_CHUNKS = "--azureblobprovider.chunkbytes=65536"  # a 1 MB input takes many range requests


def runtime(kind: str, request: pytest.FixtureRequest, tmp_path: Path, event_id: str, name: str,
            parent: str = "", *extra: str) -> Runtime:
    """An in-process runtime: development providers (``kind == "dev"``) or the module's real stack."""
    if kind == "dev":
        flags = ["--development=true", f"--context.eventid={event_id}", "--context.correlationid=corr",
                 f"--context.name={name}", f"--context.parenteventid={parent}", "--valideventtypes=file_discovered"]
    else:
        stack: Stack = request.getfixturevalue("stack")
        flags = seed_args(stack, event_id, "corr", name, parent=parent) + [SMALL_CHUNKS]
    cfg, _ = compose_config(flags + [f"--sharedsecret={SECRET}", f"--basedir={tmp_path / (event_id + '-' + name)}",
                                     f"--devdir={tmp_path / '.dev'}", "--transfer.retries=0", *extra])
    return Runtime.for_config(cfg)


def commit_parent(parent: Runtime, files: dict[str, bytes]) -> str:
    """Commit ``files`` (paths under out/data -> bytes) through the parent's /done in one event listing
    them all; returns the child event id."""
    with TestClient(create_app(parent)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        for path, data in files.items():
            (parent.layout.out_data / path).parent.mkdir(parents=True, exist_ok=True)
            (parent.layout.out_data / path).write_bytes(data)
        (parent.layout.out_events / "e.json").write_text(json.dumps([
            {"key": "eventType", "value": "file_discovered"}, {"key": "files", "value": ",".join(files)}]))
        done = client.get("/done", headers=H)
        assert done.status_code == 200, done.text
        return done.json()["events"][0]["eventId"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative POSIX path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def reserved_names() -> dict[str, bytes]:
    """Inputs named exactly as the sidecar names (or named) its own files: the partial file beside an
    input (the old scheme wrote ``in/data/.{md5(name)[:16]}.partial``), a folder at that name next to
    the input, and the staging folder with the staged and partial names it uses for an input."""
    def old_partial(path: str) -> str:
        return partial_path(Path(path)).as_posix()

    staged_x = staged_file(Path(".staging"), "x")  # in/.staging/{sha256("x")} while x downloads
    return {
        "x": os.urandom(1_000_000),
        old_partial("x"): b"an input named as x's partial download",
        "sub/z": b"z" * 70_000,
        old_partial("sub/z") + "/inner": b"a folder named as z's partial download",
        staged_x.as_posix(): b"an input named as x's staged download",
        partial_path(staged_x).as_posix(): b"and its partial file",
        staged_x.name: b"the staged name at the top of in/data",
        "meta.json": b"not in/meta.json",
        "data/x": b"not in/data/x",
    }


@pytest.mark.parametrize("kind", ["dev", "azure"])
def test_inputs_named_as_the_sidecars_own_files_all_arrive_byte_for_byte(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    files = reserved_names()
    child_id = commit_parent(runtime(kind, request, tmp_path, f"names-{kind}", "parent"), files)
    child = runtime(kind, request, tmp_path, child_id, "child", f"names-{kind}")
    with TestClient(create_app(child)) as client:
        ready = client.get("/ready", headers=H)
    assert ready.status_code == 200, ready.text
    assert ready.json()["files"] == len(files)
    assert tree(child.layout.in_data) == files  # every listed file, byte for byte, and nothing else
    assert sorted(os.listdir(child.layout.basedir / "in")) == ["data", "meta.json"], "no staging folder is left"


def test_a_killed_ready_leaves_no_temp_in_in_data_and_the_restarted_one_stages_exactly(
        stack: Stack, tmp_path: Path) -> None:
    """SIGKILL while the Azure download of ``x`` hangs (other inputs done): the module's folder holds
    only whole inputs, and the restarted sidecar's /ready stages every input exactly once more."""
    files = reserved_names()
    parent = Runtime.for_config(compose_config(seed_args(stack, "kill", "corr", "parent") + [
        f"--sharedsecret={SECRET}", f"--basedir={tmp_path / 'parent'}", f"--devdir={tmp_path / '.dev'}"])[0])
    child_id = commit_parent(parent, files)
    work = tmp_path / "child"
    work.mkdir()
    sidecar = RestartableSidecar(work, seed_args(stack, child_id, "corr", "child", parent="kill")
                                 + [f"--devdir={work / '.dev'}", SMALL_CHUNKS, "--transfer.concurrency=1",
                                    "--azureblobprovider.readtimeoutseconds=60"])
    sidecar.start()
    try:
        sidecar.wait_healthy()
        # The second range of x: its first 64 KiB are in its partial file when the download hangs.
        stack.blob_proxy.hang_when(rb"(?i)GET /[^ ]*/kill/parent/x HTTP/1\.1\r\n.*?range: bytes=65536-", forward=True)
        answers: dict[str, object] = {}

        def call() -> None:
            try:
                answers["first"] = httpx.get(f"{sidecar.url}/ready", headers=H, timeout=300).status_code
            except httpx.HTTPError as exc:
                answers["first"] = type(exc).__name__

        caller = threading.Thread(target=call)
        caller.start()
        assert stack.blob_proxy.triggered.wait(60), "the download of x never started"
        time.sleep(1.0)
        in_data = sidecar.basedir / "in" / "data"
        at_kill = tree(in_data) if in_data.exists() else {}
        staging = sidecar.basedir / "in" / ".staging"
        assert [p.name for p in staging.iterdir()] == [partial_path(staged_file(staging, "x")).name], \
            "killed while x was being staged"
        sidecar.kill()
        caller.join()
        stack.blob_proxy.up(resume=False)
        assert "x" not in at_kill and all(files[name] == data for name, data in at_kill.items()), \
            f"only whole inputs are in in/data while staging: {sorted(at_kill)}"
        sidecar.start()
        sidecar.wait_healthy()
        again = httpx.get(f"{sidecar.url}/ready", headers=H, timeout=300)
        assert again.status_code == 200, again.text
        assert tree(in_data) == files
        assert sorted(os.listdir(sidecar.basedir / "in")) == ["data", "meta.json"], "the killed run's temp is gone"
    finally:
        stack.blob_proxy.up()
        sidecar.stop()


def dev(tmp_path: Path, *extra: str) -> Runtime:
    """A development-mode runtime in ``tmp_path/ion`` (event ``e-links``, module ``m``)."""
    cfg, _ = compose_config(["--development=true", "--context.eventid=e-links", "--context.correlationid=c",
                             "--context.name=m", f"--sharedsecret={SECRET}", f"--basedir={tmp_path / 'ion'}",
                             f"--devdir={tmp_path / '.dev'}", *extra])
    return Runtime.for_config(cfg)


def precious(tmp_path: Path) -> Path:
    """A folder of someone else's files, outside the module's folders."""
    folder = tmp_path / "precious"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "sub" / "data.bin").write_bytes(b"x" * 10)
    (folder / "run.json").write_text("not the sidecar's")
    (folder / "meta.json").write_text("[]")
    return folder


# (entry under the base directory, what it is) -> whether /ready refuses it (400) or removes it as a link.
REFUSED = [("in", "link"), ("out", "link"), ("in", "file"), ("out", "file"), ("in", "dangling")]
UNLINKED = ["in/data", "out/data", "out/events", "in/meta.json", "in/.staging", "out/data/sub/deep", "in/data/a/b"]


@pytest.mark.parametrize("name,what", REFUSED)
def test_ready_refuses_in_or_out_that_is_a_link_or_not_a_folder_and_deletes_nothing(
        tmp_path: Path, name: str, what: str) -> None:
    outside = precious(tmp_path)
    before = tree(outside)
    base = tmp_path / "ion"
    base.mkdir()
    (base / "out" if name == "in" else base / "in").mkdir()
    (base / ("out" if name == "in" else "in") / "left.txt").write_text("left by another run")
    entry = base / name
    if what == "link":
        os.symlink(outside, entry)
    elif what == "dangling":
        os.symlink(tmp_path / "nothing", entry)
    else:
        entry.write_text("a file where a folder belongs")
    with TestClient(create_app(dev(tmp_path))) as client:
        ready = client.get("/ready", headers=H)
    assert ready.status_code == 400, ready.text
    assert ready.json()["message"].startswith(f"{name}: is ")
    assert tree(outside) == before, "nothing outside the module's folders was touched"
    assert tree(base / ("out" if name == "in" else "in")) == {"left.txt": b"left by another run"}, \
        "nothing was deleted"
    assert entry.is_symlink() if what != "file" else entry.read_text() == "a file where a folder belongs"


@pytest.mark.parametrize("name", UNLINKED)
def test_links_inside_in_and_out_are_removed_as_links_never_followed(tmp_path: Path, name: str) -> None:
    outside = precious(tmp_path)
    before = tree(outside)
    base = tmp_path / "ion"
    (base / name).parent.mkdir(parents=True)
    os.symlink(outside / "meta.json" if name.endswith(".json") else outside, base / name)
    runtime = dev(tmp_path)
    with TestClient(create_app(runtime)) as client:
        ready = client.get("/ready", headers=H)
    assert ready.status_code == 200, ready.text
    assert tree(outside) == before, "nothing outside the module's folders was touched"
    for folder in (runtime.layout.in_data, runtime.layout.out_data, runtime.layout.out_events):
        assert folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())
    assert not runtime.layout.in_meta.is_symlink() and json.loads(runtime.layout.in_meta.read_text()) == []


def test_a_linked_run_state_folder_is_refused_and_written_through_never(tmp_path: Path) -> None:
    outside = precious(tmp_path)
    before = tree(outside)
    base = tmp_path / "ion"
    base.mkdir()
    os.symlink(outside, base / ".sidecar")
    with TestClient(create_app(dev(tmp_path))) as client:
        ready = client.get("/ready", headers=H)
    assert ready.status_code == 500 and ".sidecar" in ready.json()["message"], ready.text
    assert "is a link" in ready.json()["message"]
    assert tree(outside) == before


@pytest.mark.parametrize("kind", ["dev", "azure"])
def test_a_child_whose_event_meta_is_missing_is_refused_naming_its_parent_and_the_store(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A wrong collection or a dev child run from another --devdir: the meta was looked for in the
    wrong store. 502 (as a listed blob that does not exist), and no in/meta.json for the module to read."""
    child = runtime(kind, request, tmp_path, "orphan-evt", "child", f"parent-of-{kind}")
    with TestClient(create_app(child)) as client:
        ready = client.get("/ready", headers=H)
        again = client.get("/ready", headers=H)  # the module's retry loop is told the same, never a 200
    assert ready.status_code == again.status_code == 502, ready.text
    message = ready.json()["message"]
    store = (f"JSON files under {tmp_path / '.dev' / 'documents'}" if kind == "dev"
             else f"collection '{request.getfixturevalue('stack').collection}'")
    assert "'orphan-evt'" in message and f"'parent-of-{kind}'" in message and store in message, message
    assert not child.layout.in_meta.exists() and not any(child.layout.in_data.iterdir())


def test_the_first_module_of_a_graph_has_no_parent_and_no_event_meta(tmp_path: Path) -> None:
    first = runtime("dev", None, tmp_path, "root-evt", "first")
    with TestClient(create_app(first)) as client:
        ready = client.get("/ready", headers=H)
    assert ready.status_code == 200 and ready.json()["files"] == 0, ready.text
    assert json.loads(first.layout.in_meta.read_text()) == []
