"""Validation of a module's outputs (sidecar/layout.py): one bad file -> InputError naming it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from flows.runtime import split_batches
from sidecar.errors import InputError
from sidecar.layout import ModuleLayout, plan_outputs, write_json_atomic
from testsupport.outputs import BAD_EVENTS, pairs

TYPES = ["file_discovered", "face_detected"]


@pytest.fixture
def layout(tmp_path: Path) -> ModuleLayout:
    lay = ModuleLayout(tmp_path / "ion")
    lay.prepare()
    (lay.out_data / "sub").mkdir()
    (lay.out_data / "sub" / "a.txt").write_text("a")
    (lay.out_data / "b.bin").write_bytes(b"bb")
    return lay


def event(layout: ModuleLayout, name: str, content: object) -> Path:
    path = layout.out_events / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_good_outputs_plan(layout: ModuleLayout) -> None:
    event(layout, "1.json", pairs(eventType="file_discovered", files="sub/a.txt, b.bin", colour="red"))
    event(layout, "2.json", pairs(eventType="face_detected"))
    (layout.out_meta).write_text(json.dumps(pairs(score="0.9")))
    plan = plan_outputs(layout, TYPES, 1024)
    assert [f.path for f in plan.files] == ["b.bin", "sub/a.txt"] and plan.bytes == 3
    assert [e.file for e in plan.events] == ["1.json", "2.json"]
    assert plan.events[0].files == ["sub/a.txt", "b.bin"]
    assert [(p.key, p.value) for p in plan.events[0].data] == [("colour", "red")]
    assert plan.events[1].files == [] and [(p.key, p.value) for p in plan.insight] == [("score", "0.9")]


def test_absent_or_empty_insight_means_none(layout: ModuleLayout) -> None:
    assert plan_outputs(layout, TYPES, 1024).insight == []
    layout.out_meta.write_text("  \n")
    assert plan_outputs(layout, TYPES, 1024).insight == []


@pytest.mark.parametrize("case, content, expected", BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_bad_event_file_names_file_and_problem(layout: ModuleLayout, case: str, content: object, expected: str) -> None:
    event(layout, "0-good.json", pairs(eventType="file_discovered"))
    event(layout, "bad.json", content)
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    assert err.value.file == "out/events/bad.json"
    assert str(err.value).startswith("out/events/bad.json") and expected in str(err.value)


@pytest.mark.parametrize("value, files", [
    ("", []), ("  ", []), ("b.bin", ["b.bin"]), ("b.bin,", ["b.bin"]), (",b.bin", ["b.bin"]),
    ("b.bin,,sub/a.txt", ["b.bin", "sub/a.txt"]), (" b.bin , b.bin ", ["b.bin"]),
])
def test_files_lists_paths_and_an_empty_value_means_no_files(layout: ModuleLayout, value: str, files: list[str]) -> None:
    """``files`` is a comma-separated list (DESIGN.md, Folder contract): "" is the list of no path, as an
    absent key and an empty out/meta.json mean none; empty entries and repeats name nothing more."""
    event(layout, "1.json", pairs(eventType="file_discovered", files=value))
    assert plan_outputs(layout, TYPES, 1024).events[0].files == files


def test_bad_insight_names_out_meta(layout: ModuleLayout) -> None:
    layout.out_meta.write_text('{"score": 1}')
    with pytest.raises(InputError, match=r"^out/meta.json: .*got dict"):
        plan_outputs(layout, TYPES, 1024)


def test_symlink_out_of_out_data_is_rejected(layout: ModuleLayout, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    os.symlink(secret, layout.out_data / "leak.txt")
    with pytest.raises(InputError, match="out/data/leak.txt: is a link that points outside out/data"):
        plan_outputs(layout, TYPES, 1024)


def test_symlinked_folder_out_of_out_data_is_rejected(layout: ModuleLayout, tmp_path: Path) -> None:
    os.symlink(tmp_path, layout.out_data / "escape")
    with pytest.raises(InputError, match="out/data/escape"):
        plan_outputs(layout, TYPES, 1024)


def test_symlink_inside_out_data_is_a_file(layout: ModuleLayout) -> None:
    os.symlink(layout.out_data / "b.bin", layout.out_data / "alias.bin")
    event(layout, "1.json", pairs(eventType="file_discovered", files="alias.bin"))
    plan = plan_outputs(layout, TYPES, 1024)
    assert "alias.bin" in [f.path for f in plan.files] and plan.events[0].files == ["alias.bin"]


def test_anything_but_json_files_in_events_is_refused_by_name(layout: ModuleLayout) -> None:
    # A misnamed event file skipped in silence would be a child event lost behind a 200.
    (layout.out_events / "notes.txt").write_text("scratch")
    with pytest.raises(InputError, match=r"^out/events/notes.txt: is not an event file"):
        plan_outputs(layout, TYPES, 1024)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind, bytes (files), target (links) and modification time."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = os.readlink(path) if path.is_symlink() else path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        found[path.relative_to(root).as_posix()] = (stat.S_IFMT(info.st_mode), content, info.st_mtime_ns)
    return found


def test_every_entry_outside_the_contract_is_named_at_once_and_left_as_it_is(layout: ModuleLayout) -> None:
    """One /done names all that is wrong under out/ (so one fix suffices) and changes nothing there: the
    module moves its files into place and calls /done again."""
    out = layout.basedir / "out"
    event(layout, "1.json", pairs(eventType="file_discovered", files="b.bin"))
    (out / "result.txt").write_text("r")
    (out / "Events").mkdir()
    (out / "Events" / "2.json").write_text(json.dumps(pairs(eventType="face_detected")))
    (out / ".gitkeep").write_text("")
    (layout.out_data / "empty" / "inner").mkdir(parents=True)
    os.mkfifo(layout.out_data / "pipe")
    before = snapshot(out)
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    assert err.value.files == ["out/.gitkeep", "out/Events/", "out/result.txt", "out/data/empty/", "out/data/pipe"]
    message = str(err.value)
    assert message.startswith("out/.gitkeep: is not part of the folder contract; out/Events/: is not part of the "
                              "folder contract (did you mean out/events?); out/result.txt: "), message
    assert "out/ holds only data/ for output files, meta.json for insights and events/" in message
    assert snapshot(out) == before
    os.rename(out / "Events" / "2.json", layout.out_events / "2.json")
    os.rename(out / "result.txt", layout.out_data / "result.txt")
    for leftover in (out / "Events", layout.out_data / "empty" / "inner", layout.out_data / "empty"):
        leftover.rmdir()
    for leftover in (out / ".gitkeep", layout.out_data / "pipe"):
        leftover.unlink()
    plan = plan_outputs(layout, TYPES, 1024)
    assert [f.path for f in plan.files] == ["b.bin", "result.txt", "sub/a.txt"]
    assert [e.file for e in plan.events] == ["1.json", "2.json"]


def test_a_long_list_of_refused_entries_is_counted_past_the_first_twenty(layout: ModuleLayout) -> None:
    for i in range(25):
        (layout.out_data / f"empty-{i:02d}").mkdir()
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    assert len(err.value.files) == 25 and str(err.value).count("is a folder with no file in it") == 20
    assert str(err.value).endswith("; and 5 more"), str(err.value)[-80:]


def test_the_folders_the_sidecar_and_the_module_client_write_are_the_contract(layout: ModuleLayout) -> None:
    """What prepare() creates and what ion_sidecar_client writes (its temp files renamed into place) is
    accepted: nothing of the sidecar's own lives in out/ (its run record is .sidecar/, beside it)."""
    from ion_sidecar_client import SidecarClient

    client = SidecarClient(url="http://unused", secret="long-enough-secret", basedir=layout.basedir)
    client.write_file("c/d.txt", b"d")
    client.write_event("e1", "file_discovered", files=["c/d.txt"], colour="red")
    client.write_insight(score="1")
    assert sorted(os.listdir(layout.basedir / "out")) == ["data", "events", "meta.json"]
    plan = plan_outputs(layout, TYPES, 1024)
    assert [f.path for f in plan.files] == ["b.bin", "c/d.txt", "sub/a.txt"] and len(plan.events) == 1


# Each kind of entry under out/data and what /done does with it: committed (the paths) or refused (the
# name in the message). Nothing is skipped in silence.
def _socket(d: Path) -> None:
    os.mknod(d / "s.sock", stat.S_IFSOCK | 0o600)


OUT_DATA_KINDS = [
    ("file", lambda d: (d / "f.txt").write_text("f"), ["f.txt"]),
    ("hidden file", lambda d: (d / ".hidden").write_text("h"), [".hidden"]),
    ("empty file", lambda d: (d / "zero").write_bytes(b""), ["zero"]),
    ("link to a file inside", lambda d: os.symlink("b.bin", d / "alias.bin"), ["alias.bin"]),
    ("link to a folder inside", lambda d: os.symlink("sub", d / "again"), ["again/a.txt"]),
    ("empty folder", lambda d: (d / "none").mkdir(), "out/data/none/"),
    ("folder of empty folders", lambda d: (d / "x" / "y").mkdir(parents=True), "out/data/x/"),
    ("link to an empty folder", lambda d: ((d / "sub" / "e").mkdir(), os.symlink("sub/e", d / "le")), "out/data/le/"),
    ("fifo", lambda d: os.mkfifo(d / "p"), "out/data/p"),
    ("socket", _socket, "out/data/s.sock"),
    ("broken link", lambda d: os.symlink("gone", d / "gone"), "out/data/gone"),
    ("link out of the tree", lambda d: os.symlink("/etc/hostname", d / "host"), "out/data/host"),
    ("link loop", lambda d: os.symlink("loop", d / "loop"), "out/data/loop"),
]


@pytest.mark.parametrize("kind, write, expected", OUT_DATA_KINDS, ids=[k[0] for k in OUT_DATA_KINDS])
def test_each_kind_of_entry_in_out_data_is_committed_or_refused_by_name(layout: ModuleLayout, kind: str, write,
                                                                       expected: list[str] | str) -> None:
    write(layout.out_data)
    if isinstance(expected, list):
        paths = [f.path for f in plan_outputs(layout, TYPES, 1024).files]
        assert paths == sorted(["b.bin", "sub/a.txt", *expected]), paths
    else:
        with pytest.raises(InputError) as err:
            plan_outputs(layout, TYPES, 1024)
        assert expected in err.value.files, str(err.value)


def test_no_valid_event_types_rejects_every_event(layout: ModuleLayout) -> None:
    event(layout, "1.json", pairs(eventType="file_discovered"))
    with pytest.raises(InputError, match="--valideventtypes is empty"):
        plan_outputs(layout, [], 1024)


def test_split_batches_balances_and_bounds() -> None:
    sizes = [100, 1, 1, 1, 50, 50]
    batches = split_batches(sizes, 3, lambda s: s, least=1)
    assert len(batches) == 3 and sorted(x for b in batches for x in b) == sorted(sizes)
    assert max(sum(b) for b in batches) == 100
    assert split_batches([], 4, len) == [] and split_batches([5], 4, lambda s: s) == [[5]]


def test_small_transfers_are_one_batch_and_large_ones_batches_of_at_least_the_least() -> None:
    MiB = 1024 * 1024
    assert len(split_batches([4096] * 1000, 4, lambda s: s)) == 1  # 4 MiB: one task run, not four
    assert len(split_batches([MiB] * 127, 4, lambda s: s)) == 1  # under twice the least
    assert len(split_batches([MiB] * 128, 4, lambda s: s)) == 2
    batches = split_batches([64 * MiB] * 8, 4, lambda s: s)
    assert len(batches) == 4 and all(sum(b) == 128 * MiB for b in batches)
    assert len(split_batches([0] * 10, 4, lambda s: s)) == 1  # empty files: one batch


def test_json_written_atomically_is_readable_like_any_new_file(tmp_path: Path) -> None:
    """in/meta.json is read by the module, which may run as another user on the shared volume: it gets
    the mode ``open()`` gives a new file (0666 less the umask), as the staged in/data files do, not the
    0600 of a temp file."""
    reference = tmp_path / "reference"
    reference.write_text("x")
    for umask in (0o022, 0o002, 0o077):
        previous = os.umask(umask)
        try:
            written = tmp_path / f"meta-{umask:o}.json"
            write_json_atomic(written, [{"key": "k", "value": "v"}])
            reference.unlink()
            reference.write_text("x")
        finally:
            os.umask(previous)
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("key, value, expected", [
    ("eventtype", "file_discovered", "key 'eventType': required key is missing (did you mean 'eventType'? the file has 'eventtype'"),
    ("EventType", "file_discovered", "did you mean 'eventType'? the file has 'EventType'"),
    ("event_type", "file_discovered", "did you mean 'eventType'? the file has 'event_type'"),
    ("Files", "b.bin", "key 'Files': did you mean 'files'?"),
    ("FILES", "nothing-here", "key 'FILES': did you mean 'files'?"),
    ("file", "sub/a.txt", "key 'file': did you mean 'files'?"),
])
def test_a_near_miss_of_a_reserved_key_is_named_with_the_key_meant(layout: ModuleLayout, key: str, value: str,
                                                                   expected: str) -> None:
    """A key differing from eventType/files in case, separators or a letter: the 400 says which was meant.
    A misspelt ``files`` is refused, not passed on as data: the child would get none of the files."""
    content = pairs(**{key: value}) if key.casefold().replace("_", "") == "eventtype" else \
        pairs(eventType="file_discovered", **{key: value})
    event(layout, "1.json", content)
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    assert str(err.value).startswith("out/events/1.json: key '") and expected in str(err.value), str(err.value)


def test_a_data_key_named_file_that_names_no_output_is_passed_on(layout: ModuleLayout) -> None:
    event(layout, "1.json", pairs(eventType="file_discovered", file="report for the child"))
    assert [(p.key, p.value) for p in plan_outputs(layout, TYPES, 1024).events[0].data] == [("file", "report for the child")]


@pytest.mark.parametrize("value, expected", [
    ("data/b.bin", "'data/b.bin' is not a file under out/data; paths are relative to out/data: did you mean 'b.bin'?"),
    ("out/data/sub/a.txt", "paths are relative to out/data: did you mean 'sub/a.txt'?"),
    ("B.BIN", "names are case-sensitive: did you mean 'b.bin'?"),
    ("b.bin sub/a.txt", "separate names with commas: 'files' is split on commas, each name trimmed of leading and "
                        "trailing blanks"),
    ("b.bin;sub/a.txt", "separate names with commas"),
    ("c.txt ", "the file 'c.txt ' cannot be listed: 'files' is split on commas, each name trimmed"),
    ("nope.txt", "'nope.txt' is not a file under out/data ('files' is split on commas, each name trimmed of leading "
                 "and trailing blanks, and names a file by its path relative to out/data)"),
])
def test_a_listed_file_not_found_says_how_files_is_read(layout: ModuleLayout, value: str, expected: str) -> None:
    (layout.out_data / "c.txt ").write_text("c")  # a name the trimmed list cannot reach
    event(layout, "1.json", pairs(eventType="file_discovered", files=value))
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    assert err.value.key == "files" and expected in str(err.value), str(err.value)


def test_every_problem_of_one_done_is_told_at_once_with_what_sets_each_limit(layout: ModuleLayout) -> None:
    """An empty folder, an oversized out/meta.json, an oversized event and a bad event: one 400 naming
    all four (a first user needed a /done for each), each size limit with what sets it."""
    (layout.out_data / "empty").mkdir()
    layout.out_meta.write_text(json.dumps(pairs(pad="x" * (2 * 1024 * 1024))))
    event(layout, "1.json", pairs(eventType="file_discovered", pad="x" * 2000))
    event(layout, "2.json", pairs(eventType="cat_found"))
    event(layout, "3.json", pairs(eventType="file_discovered", files="b.bin"))
    with pytest.raises(InputError) as err:
        plan_outputs(layout, TYPES, 1024)
    message = str(err.value)
    assert err.value.files == ["out/data/empty/", "out/meta.json", "out/events/1.json", "out/events/2.json"], message
    assert "out/meta.json: " in message and "no flag raises it" in message
    assert "out/events/1.json: " in message and "over the limit of 1024 bytes (set by --maxeventbytes)" in message
    assert "out/events/2.json: key 'eventType': event type 'cat_found'" in message
