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


def test_no_valid_event_types_rejects_every_event(layout: ModuleLayout) -> None:
    event(layout, "1.json", pairs(eventType="file_discovered"))
    with pytest.raises(InputError, match="--valideventtypes is empty"):
        plan_outputs(layout, [], 1024)


def test_split_batches_balances_and_bounds() -> None:
    sizes = [100, 1, 1, 1, 50, 50]
    batches = split_batches(sizes, 3, lambda s: s)
    assert len(batches) == 3 and sorted(x for b in batches for x in b) == sorted(sizes)
    assert max(sum(b) for b in batches) == 100
    assert split_batches([], 4, len) == [] and split_batches([5], 4, lambda s: s) == [[5]]


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
