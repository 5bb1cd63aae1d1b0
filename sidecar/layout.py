"""The module's folder contract under the base directory, and the reading of its outputs.

``DESIGN.md`` (Folder contract) and ``spec/SIDECAR.md`` (Data Handling) define it:
``in/data/**``, ``in/meta.json``, ``out/data/**``, ``out/meta.json`` and ``out/events/*.json``.
``plan_outputs`` reads and validates everything under ``out/`` before a single byte is committed, so one
bad file fails ``/done`` with :class:`~sidecar.errors.InputError` and commits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from sidecar.errors import InputError
from sidecar.models import KeyValuePair

log = logging.getLogger(__name__)

# Largest out/meta.json accepted, bytes: Cosmos DB's API for MongoDB stores documents up to 2 MiB.
MAX_INSIGHT_BYTES = 2 * 1024 * 1024

_PAIRS = TypeAdapter(list[KeyValuePair])


@dataclass(frozen=True)
class ModuleLayout:
    """Paths of the folder contract below ``basedir`` (the volume shared with the module)."""

    basedir: Path

    @property
    def in_data(self) -> Path:
        return self.basedir / "in" / "data"

    @property
    def in_meta(self) -> Path:
        return self.basedir / "in" / "meta.json"

    @property
    def out_data(self) -> Path:
        return self.basedir / "out" / "data"

    @property
    def out_meta(self) -> Path:
        return self.basedir / "out" / "meta.json"

    @property
    def out_events(self) -> Path:
        return self.basedir / "out" / "events"

    def prepare(self) -> None:
        """Create ``in/data``, ``out/data`` and ``out/events`` (and parents) if missing."""
        for folder in (self.in_data, self.out_data, self.out_events):
            folder.mkdir(parents=True, exist_ok=True)

    def clear(self) -> list[str]:
        """Empty ``in/`` and ``out/`` so this run starts from nothing but its own inputs.

        Whatever is there was left by another run on the same volume (a restarted pod, or two modules
        run one after the other in one folder); committed on ``/done`` it would be published as this
        run's output. Returns the names removed (relative to the base directory).
        """
        removed: list[str] = []
        for top in (self.basedir / "in", self.basedir / "out"):
            if not top.is_dir():
                continue
            for entry in sorted(top.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    if any(entry.iterdir()):
                        removed.append(self.name(entry) + "/")
                    shutil.rmtree(entry)
                else:
                    removed.append(self.name(entry))
                    entry.unlink()
        return removed

    def name(self, path: Path) -> str:
        """``path`` as the module sees it, relative to the base directory (for messages)."""
        try:
            return path.relative_to(self.basedir).as_posix()
        except ValueError:
            return str(path)

    def write_input_meta(self, pairs: list[KeyValuePair]) -> None:
        """Write ``in/meta.json`` atomically (temp file, then rename) as a KeyValuePairs array."""
        write_json_atomic(self.in_meta, [p.model_dump() for p in pairs])


@dataclass(frozen=True)
class OutputFile:
    """A file under ``out/data``: ``path`` relative to it (POSIX), ``local`` on disk, ``size`` bytes."""

    path: str
    local: Path
    size: int


@dataclass(frozen=True)
class PlannedEvent:
    """A validated event file: its name, type, the files it passes on and the other pairs."""

    file: str  # file name within out/events, e.g. "0001.json"
    event_type: str
    files: list[str]  # paths relative to out/data
    data: list[KeyValuePair]


@dataclass
class DonePlan:
    """Everything ``/done`` will commit, read and validated, with no data-plane I/O yet."""

    files: list[OutputFile] = field(default_factory=list)
    insight: list[KeyValuePair] = field(default_factory=list)
    events: list[PlannedEvent] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Total size of the output files, bytes."""
        return sum(f.size for f in self.files)


def write_json_atomic(path: Path, value: object) -> None:
    """Write ``value`` as JSON to ``path`` via a temp file in the same folder and a rename, so a
    reader or a crash never sees half a file and concurrent writers never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_pairs(path: Path, shown: str, max_bytes: int, *, empty_ok: bool) -> list[KeyValuePair]:
    """Read a KeyValuePairs JSON file (spec: Insight Schema, Events Schema).

    Args:
        path: the file.
        shown: the name used in error messages (e.g. ``"out/events/a.json"``).
        max_bytes: largest size accepted, bytes.
        empty_ok: an empty (or blank) file means no pairs instead of an error.

    Raises:
        InputError: too large, empty (unless ``empty_ok``), malformed JSON, or not an array of
            ``{"key", "value"}`` string pairs; the message names ``shown`` and the offending item.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(shown, f"{size} bytes is over the limit of {max_bytes} bytes")
    raw = path.read_bytes()
    if not raw.strip():
        if empty_ok:
            return []
        raise InputError(shown, "the file is empty; expected a JSON array of key/value pairs")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(shown, f"malformed JSON: {exc}") from None
    try:
        return _PAIRS.validate_python(value)
    except ValidationError as exc:
        raise InputError(shown, _describe_pairs_error(value, exc)) from None


def _describe_pairs_error(value: object, exc: ValidationError) -> str:
    expected = 'expected a JSON array of {"key": "...", "value": "..."} string pairs'
    if not isinstance(value, list):
        return f"{expected}, got {type(value).__name__}"
    first = exc.errors()[0]
    loc = first["loc"]
    index = loc[0] if loc and isinstance(loc[0], int) else None
    item = value[index] if index is not None else None
    where = f"item {index}"
    if isinstance(item, dict) and isinstance(item.get("key"), str):
        where += f" (key '{item['key']}')"
    field_name = f" field '{loc[1]}'" if len(loc) > 1 else ""
    return f"{where}{field_name}: {first['msg']}; {expected}"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def list_output_files(layout: ModuleLayout) -> list[OutputFile]:
    """Every file under ``out/data`` (subfolders included), sorted by path.

    Raises:
        InputError: a link under ``out/data`` points outside it.
    """
    root = layout.out_data
    if not root.is_dir():
        return []
    real_root = root.resolve()
    found: list[OutputFile] = []
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            entry = Path(folder) / name
            if entry.is_symlink() and not _inside(entry.resolve(), real_root):
                raise InputError(layout.name(entry), "is a link that points outside out/data")
        for name in names:
            entry = Path(folder) / name
            if entry.is_file():
                rel = entry.relative_to(root).as_posix()
                found.append(OutputFile(rel, entry, entry.stat().st_size))
    return sorted(found, key=lambda f: f.path)


def _event_files(value: str, shown: str, outputs: dict[str, OutputFile]) -> list[str]:
    paths: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith(("/", "\\")) or (len(entry) > 1 and entry[1] == ":"):
            raise InputError(shown, f"'{entry}' is an absolute path; name files relative to out/data", key="files")
        normal = os.path.normpath(entry).replace(os.sep, "/")
        if normal == ".." or normal.startswith("../"):
            raise InputError(shown, f"'{entry}' escapes out/data", key="files")
        if normal not in outputs:
            raise InputError(shown, f"'{entry}' is not a file under out/data", key="files")
        if normal not in paths:
            paths.append(normal)
    return paths


def plan_outputs(layout: ModuleLayout, valid_event_types: list[str], max_event_bytes: int) -> DonePlan:
    """Read and validate everything under ``out/``; touch no data-plane service.

    Args:
        layout: the module's folders.
        valid_event_types: the event types this module may publish (``--valideventtypes``).
        max_event_bytes: largest event file accepted, bytes.

    Returns:
        The :class:`DonePlan`: output files, insight pairs and events, in a stable order.

    Raises:
        InputError: the first problem found, naming the file (and key): see ``DESIGN.md``,
            Folder contract.
    """
    files = list_output_files(layout)
    by_path = {f.path: f for f in files}
    insight: list[KeyValuePair] = []
    if layout.out_meta.is_file():
        insight = read_pairs(layout.out_meta, "out/meta.json", MAX_INSIGHT_BYTES, empty_ok=True)
    events: list[PlannedEvent] = []
    if layout.out_events.is_dir():
        for entry in sorted(layout.out_events.iterdir()):
            if entry.suffix != ".json" or not entry.is_file():
                log.warning("ignoring %s: events are out/events/*.json files", layout.name(entry))
                continue
            shown = layout.name(entry)
            pairs = read_pairs(entry, shown, max_event_bytes, empty_ok=False)
            events.append(_plan_event(entry.name, shown, pairs, valid_event_types, by_path))
    return DonePlan(files=files, insight=insight, events=events)


def _plan_event(
    name: str, shown: str, pairs: list[KeyValuePair], valid: list[str], outputs: dict[str, OutputFile]
) -> PlannedEvent:
    for required in ("eventType", "files"):
        if sum(p.key == required for p in pairs) > 1:
            raise InputError(shown, "appears more than once", key=required)
    event_type = next((p.value for p in pairs if p.key == "eventType"), None)
    if event_type is None:
        raise InputError(shown, "required key is missing", key="eventType")
    if event_type not in valid:
        allowed = ", ".join(valid) if valid else "none: --valideventtypes is empty"
        raise InputError(shown, f"event type '{event_type}' is not a valid event type ({allowed})", key="eventType")
    files_value = next((p.value for p in pairs if p.key == "files"), "")
    return PlannedEvent(
        file=name,
        event_type=event_type,
        files=_event_files(files_value, shown, outputs),
        data=[p for p in pairs if p.key not in ("eventType", "files")],
    )
