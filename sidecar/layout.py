"""The module's folder contract under the base directory, and the reading of its outputs.

``DESIGN.md`` (Folder contract) and ``spec/SIDECAR.md`` (Data Handling) define it:
``in/data/**``, ``in/meta.json``, ``out/data/**``, ``out/meta.json`` and ``out/events/*.json``.
``plan_outputs`` reads and validates everything under ``out/`` before a single byte is committed, so one
bad file fails ``/done`` with :class:`~sidecar.errors.InputError` and commits nothing.
"""

from __future__ import annotations

import collections
import difflib
import errno
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ion_sidecar_client import Layout
from pydantic import TypeAdapter, ValidationError

from sidecar.errors import InputError, OutputChanged
from sidecar.models import KeyValuePair
from sidecar.paths import collisions, inside, name_problem, segment_problem, text_problem


# Largest document stored, bytes: Cosmos DB's API for MongoDB stores documents up to 2 MiB (MongoDB
# itself 16 MiB); the smaller bound holds for every provider, so development mode refuses the same.
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
# Largest out/meta.json accepted, bytes: its insight document must fit.
MAX_INSIGHT_BYTES = MAX_DOCUMENT_BYTES
# What a file entry of an event meta may add beyond its path, key and size, bytes: an MD5 and a SAS
# URL (endpoint, container, the key percent-encoded, a token of about 200 characters).
_FILE_ENTRY_ALLOWANCE = 512

_PAIRS = TypeAdapter(list[KeyValuePair])
# What sets each size limit, told with a refusal: an event file's is a flag, the insight's is the store's.
EVENT_LIMIT = "set by --maxeventbytes"
INSIGHT_LIMIT = ("the insight is stored as one document, at most 2 MiB on every document provider (Cosmos DB); "
                 "no flag raises it: keep large results in out/data")


@dataclass(frozen=True)
class ModuleLayout(Layout):
    """Paths of the folder contract below ``basedir`` (the volume shared with the module): the module
    client's :class:`ion_sidecar_client.Layout`, so both sides of the contract name the same paths,
    plus what the sidecar does with them."""

    @property
    def staging(self) -> Path:
        """The sidecar's own folder for downloads under way, ``in/.staging``: outside ``in/data``, so no
        input's name (any name a producer may write) can be the name of a download's temp file, and on
        the same file system as ``in/data``, so a verified download is renamed into place atomically
        and a module never sees half an input. Emptied with the rest of ``in/`` by :meth:`clear`."""
        return self.basedir / "in" / ".staging"

    def check_folders(self) -> None:
        """Refuse ``in`` and ``out`` when either is a link or something other than a folder, before
        :meth:`clear` deletes anything: the sidecar empties, renames and writes below them, and through a
        link it would delete and write in whatever folder the link names (README, The folder contract).
        Entries below them are never followed: :meth:`clear` removes a link as a link.

        Raises:
            InputError: naming every refused folder at once (``in``, ``out``); nothing was deleted.
        """
        problems = []
        for top in ("in", "out"):
            path = self.basedir / top
            if path.is_symlink():
                problems.append((top, f"is a link (to {os.readlink(path)}); the sidecar deletes and writes below "
                                      f"{top}/, so it must be a folder of the module's volume, not a link: "
                                      "nothing was deleted"))
            elif path.exists() and not path.is_dir():
                problems.append((top, "is not a folder; the folder contract needs it to be one: nothing was deleted"))
        if problems:
            raise InputError.listing(problems)

    def prepare(self) -> None:
        """Create ``in/data``, ``out/data`` and ``out/events`` (and ``in``, ``out``) where missing, never
        below a link nor over something that is not a folder: those are :meth:`check_folders`' (on
        ``/ready``) and the plan's (on ``/done``) to refuse by name, not the start-up's to write through."""
        for folder in (self.in_data, self.out_data, self.out_events):
            if not any(p.is_symlink() or (p.exists() and not p.is_dir()) for p in (folder.parent, folder)):
                folder.mkdir(parents=True, exist_ok=True)

    def clear(self) -> list[str]:
        """Empty ``in/`` and ``out/`` so this run starts from nothing but its own inputs.

        Whatever is there was left by another run on the same volume (a restarted pod, or two modules
        run one after the other in one folder); committed on ``/done`` it would be published as this
        run's output. Links are removed as links, never followed; call :meth:`check_folders` first,
        which refuses ``in`` or ``out`` themselves being links. Returns the names removed (relative to
        the base directory; the sidecar's own ``in/.staging`` left by a killed ``/ready`` is not named).
        """
        removed: list[str] = []
        for top in (self.basedir / "in", self.basedir / "out"):
            if top.is_symlink() or not top.is_dir():  # check_folders refused these; never follow a link
                continue
            for entry in sorted(top.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    if any(entry.iterdir()) and entry != self.staging:
                        removed.append(self.name(entry) + "/")
                    remove_tree(entry)
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

    def fingerprint(self) -> dict[str, list[int]]:
        """What is under ``out/`` now, cheaply: ``{name: list(file_version(stat))}`` for each file under
        ``out/data`` (as the plan walks it), ``out/meta.json``, each entry of ``out/events`` and any other
        entry of ``out/``; names relative to the base directory. No file is read: a repeated ``/done``
        compares it with the one taken when its run committed (:func:`changed_since`)."""
        found: dict[str, list[int]] = {}
        files, _ = _walk_output_files(self)
        for f in files:
            found["out/data/" + f.path] = list(f.version)
        out = self.basedir / "out"
        try:
            tops = sorted(os.listdir(out))
        except OSError:
            tops = []
        entries = [out / name for name in tops if name != "data"]
        if "events" in tops and self.out_events.is_dir():
            entries.remove(self.out_events)
            entries += sorted(self.out_events.iterdir())
        for path in entries:
            try:
                stat = path.stat()
            except OSError:  # a dangling link: still an entry the module wrote
                stat = path.lstat()
            found[self.name(path)] = list(file_version(stat))
        return found

    def write_input_meta(self, pairs: list[KeyValuePair]) -> None:
        """Write ``in/meta.json`` atomically (temp file, then rename) as a KeyValuePairs array."""
        write_json_atomic(self.in_meta, [p.model_dump() for p in pairs])


def remove_tree(folder: Path) -> None:
    """Remove ``folder`` and everything below it, links as links (never followed), however deep the tree.

    ``shutil.rmtree`` recurses once per level (Python 3.11), so a tree a module nested a thousand
    folders deep raised RecursionError on every later ``/ready`` of its volume (a 500 until someone
    removed it by hand). Here each subfolder is first renamed beside ``folder`` (same file system: a
    rename, never a copy) and emptied from there, so no path grows with the depth (no PATH_MAX either).
    A sidecar killed midway leaves hidden ``.removing-*`` folders beside it: more stale entries for the
    next :meth:`ModuleLayout.clear`.

    Raises:
        OSError: an entry cannot be removed (its path in the message).
    """
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as listing:
            entries = list(listing)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                hoisted = folder.parent / f".removing-{secrets.token_hex(8)}"
                os.rename(entry.path, hoisted)
                pending.append(hoisted)
            else:
                os.unlink(entry.path)
        os.rmdir(current)


def file_version(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another without reading it: ``(size bytes, mtime_ns,
    ctime_ns, inode)``. Size and modification time alone miss a rewrite of the same size whose
    modification time was put back (``cp -p``, ``rsync -t``, ``tar -x``, ``touch -r``: a hostile trial
    got 200 for it); the change time cannot be set back (``utime`` updates it) and the inode changes
    when a file is replaced by a rename."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def changed_since(committed: dict[str, list[int]], now: dict[str, list[int]]) -> list[tuple[str, str]]:
    """The entries of ``out/`` added, removed or changed (:func:`file_version`) between two
    fingerprints (:meth:`ModuleLayout.fingerprint`), as ``(name, problem)`` sorted by name: what a repeated ``/done``
    would otherwise drop behind a 200 (README, The folder contract: a run commits once)."""
    again = "a module run commits once; start a new run (a new event) to commit it"
    problems = []
    for name in sorted(committed.keys() | now.keys()):
        if name not in committed:
            problems.append((name, f"written after /done committed this run's outputs; {again}"))
        elif name not in now:
            problems.append((name, "removed after /done committed this run's outputs; what was committed stays "
                                   "committed (a module run commits once)"))
        # A record of an older sidecar kept [size, mtime_ns]: compared on what it kept.
        elif committed[name] != now[name][:len(committed[name])]:
            problems.append((name, f"changed after /done committed this run's outputs (committed {committed[name][0]} "
                                   f"bytes, now {now[name][0]}, or it was rewritten); the committed version "
                                   f"stays; {again}"))
    return problems


@dataclass(frozen=True)
class OutputFile:
    """A file under ``out/data``: ``path`` relative to it (POSIX), ``local`` on disk, ``size`` bytes,
    ``version`` its :func:`file_version` when planned."""

    path: str
    local: Path
    size: int
    version: tuple[int, ...] = ()

    def check_unchanged(self, stored_size: int | None = None) -> None:
        """Refuse a file the module changed since it was planned: its :func:`file_version` differs
        (size, modification or change time, inode), it is gone or unreadable, or the blob stored for it (``stored_size``, bytes) does not
        hold the planned size.

        Raises:
            OutputChanged: naming the file as the module sees it (``out/data/...``).
        """
        where = "out/data/" + self.path
        try:
            now = self.local.stat()
        except OSError as exc:
            raise OutputChanged(where, f"changed after /done was called: {exc.strerror or type(exc).__name__}; "
                                       "restore it and call /done again") from None
        if file_version(now) != self.version or stored_size not in (None, self.size):
            raise OutputChanged(where, f"changed after /done was called (rewritten, or its size: planned "
                                       f"{self.size} bytes, now {now.st_size}); restore it and call /done again")


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
    reader or a crash never sees half a file and concurrent writers never interleave.

    The file gets the mode ``open()`` would give it (0666 less the umask), not ``mkstemp``'s 0600: the
    module reading ``in/meta.json`` may run as another user on the shared volume, as it reads ``in/data``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # 8 random characters, as mkstemp's (sidecar.paths.MAX_ID_SEGMENT counts them)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_pairs(path: Path, where: str, max_bytes: int, *, empty_ok: bool, limit: str = "") -> list[KeyValuePair]:
    """Read a KeyValuePairs JSON file (spec: Insight Schema, Events Schema).

    Args:
        path: the file.
        where: the name used in error messages (e.g. ``"out/events/a.json"``).
        max_bytes: largest size accepted, bytes.
        empty_ok: an empty (or blank) file means no pairs instead of an error.
        limit: what sets ``max_bytes`` (e.g. ``"set by --maxeventbytes"``), told when a file is over it.

    Raises:
        InputError: too large, empty (unless ``empty_ok``), malformed JSON, or not an array of
            ``{"key", "value"}`` string pairs; the message names ``where`` and the offending item.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(where, f"{size} bytes is over the limit of {max_bytes} bytes" + (f" ({limit})" if limit else ""))
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(where, vanished("out/")) from None
    if not raw.strip():
        if empty_ok:
            return []
        raise InputError(where, "the file is empty; expected a JSON array of key/value pairs")
    encoding = json.detect_encoding(raw)  # UTF-8 (a byte-order mark allowed), or UTF-16/32 as json.loads reads
    try:
        text = raw.decode(encoding)  # strict: json.loads(bytes) would let encoded surrogates through
    except UnicodeDecodeError as exc:
        raise InputError(where, f"malformed JSON: {_undecodable(raw, exc)}") from None
    # Each object's names as written: a name given twice would otherwise keep its last value in silence.
    repeated: dict[int, list[tuple[str, object]]] = {}

    def remember_repeats(members: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(members)
        if len(obj) < len(members):
            repeated[id(obj)] = members
        return obj

    try:
        value = json.loads(text, object_pairs_hook=remember_repeats)
    except ValueError as exc:
        raise InputError(where, f"malformed JSON: {json_problem(exc)}") from None
    except RecursionError:
        raise InputError(where, "malformed JSON: nested too deeply") from None
    if repeated and isinstance(value, list):
        for index, item in enumerate(value):
            if id(item) in repeated:
                raise InputError(where, _describe_repeats(index, repeated[id(item)]))
    try:
        pairs = _PAIRS.validate_python(value)
    except ValidationError as exc:
        raise InputError(where, _describe_pairs_error(value, exc)) from None
    _check_strings(pairs, where)
    return pairs


def json_problem(exc: ValueError) -> str:
    """What ``json.loads`` refused, for a message: its :class:`json.JSONDecodeError` as it is, or the
    ``ValueError`` it raises that is not one: an integer of more digits than Python converts
    (``sys.get_int_max_str_digits()``, 4,300 by default since CVE-2020-10735), a 500 until caught here.
    Python's own advice (raise the limit) is the sidecar's, not the module's, so it is left out."""
    if isinstance(exc, json.JSONDecodeError):
        return str(exc)
    return f"a number too long to read: {str(exc).split(';')[0]}"


def _describe_repeats(index: int, members: list[tuple[str, object]]) -> str:
    """The message for item ``index`` whose object gives a name more than once (``members`` as written).

    One pass over the members: counting each name by scanning them all again was quadratic, and an
    item of 20,000 names (208 KB) took 15 s to refuse, a 2 MiB ``out/meta.json`` about half an hour.
    The first :data:`MAX_TOLD` repeated names, and their first :data:`MAX_TOLD` values, are told."""
    values: dict[str, list[object]] = {}
    for name, value in members:
        values.setdefault(name, []).append(value)
    repeated = [(name, given) for name, given in values.items() if len(given) > 1]

    def brief(value: object) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."

    told = "; ".join(f"\"{name}\" is given {len(given)} times ("
                     + ", ".join(brief(v) for v in given[:MAX_TOLD]) + (", ..." if len(given) > MAX_TOLD else "") + ")"
                     for name, given in repeated[:MAX_TOLD])
    if len(repeated) > MAX_TOLD:
        told += f"; and {len(repeated) - MAX_TOLD} more names given more than once"
    return (f"item {index}: {told}; a JSON reader keeps only one of them, so each item must give \"key\" "
            f"and \"value\" once")


# How many repeated names of one item, and values of each, a message tells.
MAX_TOLD = 5


def _undecodable(raw: bytes, exc: UnicodeDecodeError) -> str:
    """What the bytes at ``exc.start`` are, for a file that is not valid in its encoding (UTF-8)."""
    start = exc.start
    if exc.encoding.replace("-", "").lower().startswith("utf8") and raw[start:start + 1] == b"\xed" \
            and len(raw) > start + 2 and 0xA0 <= raw[start + 1] <= 0xBF:
        code = ((raw[start] & 0x0F) << 12) | ((raw[start + 1] & 0x3F) << 6) | (raw[start + 2] & 0x3F)
        return (f"not valid UTF-8: bytes {raw[start:start + 3].hex(' ').upper()} at byte {start} encode U+{code:04X}, "
                "one half of a UTF-16 surrogate pair, as CESU-8 and Java's modified UTF-8 write characters beyond "
                "U+FFFF; UTF-8 writes such a character as one 4-byte sequence (or write it as a JSON escape pair)")
    bad = raw[start:max(exc.end, start + 1)]
    return (f"not valid {exc.encoding.upper()}: {'bytes' if len(bad) > 1 else 'byte'} {bad.hex(' ').upper()} "
            f"at byte {start} ({exc.reason})")


def _check_strings(pairs: list[KeyValuePair], file: str) -> None:
    """Refuse a pair whose key or value no data-plane service can store (``paths.text_problem``)."""
    for index, pair in enumerate(pairs):
        for field_name, text in (("key", pair.key), ("value", pair.value)):
            problem = text_problem(text)
            if problem:
                where = f"item {index} field '{field_name}'"
                raise InputError(file, f"{where} {problem}", key=pair.key)


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


def list_output_files(layout: ModuleLayout) -> list[OutputFile]:
    """Every file under ``out/data`` (subfolders included), sorted by path.

    Nothing there is skipped in silence: each entry is committed or refused (:func:`_walk_output_files`).

    Raises:
        InputError: naming every refused entry at once.
    """
    files, problems = _walk_output_files(layout)
    if problems:
        raise InputError.listing(problems)
    return files


def _walk_output_files(layout: ModuleLayout) -> tuple[list[OutputFile], list[tuple[str, str]]]:
    """The files under ``out/data``, sorted by path, and the refused entries as ``(name, problem)``,
    sorted by name. Each entry is committed or refused, none skipped in silence. Links (the one rule,
    README "The folder contract"): a link whose target is inside ``out/data`` is followed, a file or a
    folder alike, and committed under the link's own name as what it points to.

    Refused: a name that is not a good blob name (``paths.segment_problem``), a link pointing outside
    ``out/data``, a link to nothing, a link loop, a folder link that leads back to a folder holding it,
    something that is neither a file nor a folder (FIFO, socket, device), a folder so deep that no name
    below it is a blob name (too many segments or characters; not walked), and a folder with no file
    below it (a blob store holds files, not folders, so the child would never see it), named once at
    its top.
    """
    root = layout.out_data
    if not root.is_dir():
        return [], []
    real_root = os.path.realpath(root)
    found: list[OutputFile] = []
    problems: list[tuple[str, str]] = []
    empty: list[str] = []  # folders (relative, ending with "/") with no file and no refused entry below
    names_of: collections.Counter[str] = collections.Counter()  # real folder -> the names it was walked under

    def visit(folder: Path, prefix: str, ancestors: frozenset[str]) -> int:
        """Walk ``folder``; returns how many files and refused entries are below it."""
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            problems.append(("out/data/" + prefix, vanished("out/data")))
            return 1
        below = 0
        for entry in entries:
            rel = prefix + entry.name
            where = "out/data/" + rel
            problem = segment_problem(entry.name)
            path = Path(entry.path)
            if not problem and entry.is_symlink():
                # scandir's answers are cached from the listing; a link is resolved (and checked) first.
                problem = _link_problem(path, real_root)
            if problem:
                pass
            elif entry.is_dir():
                real = os.path.realpath(path)
                names_of[real] += 1
                if real in ancestors:
                    problem = "is a link to a folder that holds it (a cycle)"
                elif names_of[real] > MAX_FOLDER_NAMES:
                    # Links that multiply (40 folders each linking twice to the next: 2**40 names) made the
                    # walk go on for ever before any answer; bounded per folder, the walk is linear again.
                    problem = (f"is a link to a folder already committed under {MAX_FOLDER_NAMES} names: folder "
                               f"links may give one folder at most {MAX_FOLDER_NAMES} names")
                elif too_long := name_problem(rel + "/x"):
                    # Not walked further: no name below is a blob name, and walking a tree a thousand folders
                    # deep (a recursion) or longer than PATH_MAX (full paths) was a 500.
                    problem = f"is a folder no file below which can be committed: a name below it {too_long}"
                else:
                    mark = len(empty)  # the walk is depth first: what it adds from here on is below rel
                    inner = visit(path, rel + "/", ancestors | {real})
                    if inner == 0:  # named as a whole, not by its own empty subfolders
                        # Cut at the mark, not filtered from the whole list: that was quadratic (20,000 empty
                        # folders side by side: a 400 after 34 s).
                        del empty[mark:]
                        empty.append(rel + "/")
                    below += inner
                    continue
            elif entry.is_file():
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    problem = vanished("out/data")
                else:
                    found.append(OutputFile(rel, path, stat.st_size, file_version(stat)))
                    below += 1
                    continue
            else:
                problem = "is neither a file nor a folder (a FIFO, socket or device cannot be committed)"
            problems.append((where, problem))
            below += 1
        return below

    visit(root, "", frozenset({real_root}))
    problems += [("out/data/" + rel, "is a folder with no file in it, which cannot be committed (a blob store "
                  "holds files, not folders); remove it, or put a file in it") for rel in empty]
    return sorted(found, key=lambda f: f.path), sorted(problems)


# The most names one folder under out/data may be committed under (itself and the folder links to it,
# direct or through other links): a few aliases ("latest -> run-5") are fine, a tree of links that
# multiplies names is not.
MAX_FOLDER_NAMES = 16

def vanished(folder: str) -> str:
    """The problem of an entry of ``folder`` (``"out/data"``, ``"out/"``) listed and then gone when /done
    came to read it: the module changed its outputs meanwhile (a FileNotFoundError, a 500, before this was
    a refusal naming it)."""
    return f"vanished while /done was reading {folder}: the module changed its outputs; restore them and call /done again"


def _link_problem(path: Path, real_root: str) -> str | None:
    """Why the link ``path`` under ``out/data`` cannot be followed, or None when its target is inside
    ``out/data`` (``real_root``, links resolved)."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return "is a link to nothing (its target does not exist)"
    if not inside(real_root, real):
        return "is a link that points outside out/data"
    return None


def check_blob_names(files: list[OutputFile], key_of: Callable[[str], str]) -> None:
    """Refuse output files whose blob names (``key_of(path)``) a blob store would alter, refuse or
    merge: see :func:`sidecar.paths.name_problem` and :func:`sidecar.paths.collisions`.

    Raises:
        InputError: naming the file under ``out/data`` and the problem of its blob name.
    """
    keys: dict[str, str] = {}
    for f in files:
        key = key_of(f.path)
        problem = name_problem(key)
        if problem:
            raise InputError("out/data/" + f.path, f"its blob name '{key}' {problem}")
        keys[key] = f.path
    for first, second in collisions(keys):
        raise InputError("out/data/" + keys[second],
                         f"its blob name '{second}' collides with '{first}'")


def _event_files(value: str, where: str, outputs: dict[str, OutputFile]) -> list[str]:
    paths: dict[str, None] = {}  # insertion-ordered, and a set for the duplicate check
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith(("/", "\\")) or (len(entry) > 1 and entry[1] == ":"):
            raise InputError(where, f"'{entry}' is an absolute path; name files relative to out/data", key="files")
        normal = os.path.normpath(entry).replace(os.sep, "/")
        if normal == ".." or normal.startswith("../"):
            raise InputError(where, f"'{entry}' escapes out/data", key="files")
        if ".." in entry.split("/"):
            # normpath drops 'x/..' as text; where x is a link, the module's path names another file.
            raise InputError(where, f"'{entry}' has a '..' segment: name each file by its path under out/data (read "
                                    "as text, 'link/../b' would be out/data/b, not where the link leads)", key="files")
        if normal not in outputs:
            raise InputError(where, f"'{entry}' is not a file under out/data{_listed_file_hint(entry, normal, value, outputs)}",
                             key="files")
        paths.setdefault(normal)
    return list(paths)


# How the value of an event's "files" is read (_event_files), told when a listed name is not found.
FILES_RULE = ("'files' is split on commas, each name trimmed of leading and trailing blanks, and names a file by "
              "its path relative to out/data")


def _listed_file_hint(entry: str, normal: str, value: str, outputs: dict[str, OutputFile]) -> str:
    """Why the listed ``entry`` (``normal`` once normalised) of the ``files`` ``value`` may name no output
    file, when a near file says so: a path given from out/ or the base folder, a name differing in case, a
    file whose name begins or ends with a blank (trimmed away), names separated by something else than
    commas. Returns ``""`` or the hint, starting with ``"; "``."""
    for prefix in ("out/data/", "data/", "/out/data/"):
        if normal.startswith(prefix) and normal[len(prefix):] in outputs:
            return f"; paths are relative to out/data: did you mean '{normal[len(prefix):]}'?"
    folded = [p for p in outputs if p.casefold() == normal.casefold()]
    if folded:
        return f"; names are case-sensitive: did you mean '{folded[0]}'? ({FILES_RULE})"
    blanks = [p for p in outputs if p.strip() == normal and p != normal]
    if blanks:
        return (f"; the file {blanks[0]!r} cannot be listed: {FILES_RULE}, so rename it without the leading "
                "or trailing blanks")
    parts = [p for p in re.split(r"[;\s]+", entry) if p]
    if len(parts) > 1 and all(os.path.normpath(p).replace(os.sep, "/") in outputs for p in parts):
        return f"; separate names with commas: {FILES_RULE}"
    return f" ({FILES_RULE})"


# Keys a module may have meant for "eventType", folded (_key_fold): hinted at when "eventType" is missing.
_NEAR_EVENT_TYPE = ("eventtype", "type", "event", "eventtypes")


def _key_fold(key: str) -> str:
    """``key`` without case, blanks, ``_``, ``-`` and ``.``: ``event_type``, ``Event-Type``, ``EVENTTYPE``
    fold alike."""
    return re.sub(r"[\s_.\-]+", "", key).casefold()


def plan_outputs(layout: ModuleLayout, valid_event_types: list[str], max_event_bytes: int,
                 key_of: Callable[[str], str] | None = None) -> DonePlan:
    """Read and validate everything under ``out/``; touch no data-plane service.

    Args:
        layout: the module's folders.
        valid_event_types: the event types this module may publish (``--valideventtypes``).
        max_event_bytes: largest event file accepted, bytes.
        key_of: the blob key of an output path; when given, every key is checked
            (:func:`check_blob_names`).

    Returns:
        The :class:`DonePlan`: output files, insight pairs and events, in a stable order.

    Raises:
        InputError: naming every refused entry, out/meta.json and every refused event file at once (one
            problem each; the error as raised when there is one): see ``DESIGN.md``, Folder contract.
    """
    for folder in (layout.basedir / "out", layout.out_data, layout.out_events):
        if folder.is_symlink():
            raise InputError(layout.name(folder), "is a link; it must be a folder on the shared volume")
        if folder.exists() and not folder.is_dir():
            # Read as "no outputs" this committed nothing behind a 200, and /done runs once per run.
            raise InputError(layout.name(folder), "is not a folder; the folder contract needs it to be one")
    if layout.out_meta.exists() and not layout.out_meta.is_file():
        raise InputError("out/meta.json", "is not a file; insights are a JSON array of key/value pairs")
    stray = _stray_out_entries(layout)
    files, problems = _walk_output_files(layout)
    # Every problem of one /done is told at once (each file's first), so a module fixes them all before its next.
    refused: list[tuple[str, str]] = stray + problems
    raised: list[InputError] = []

    def check(step: Callable[[], object]) -> object:
        try:
            return step()
        except InputError as exc:
            raised.append(exc)
            prefix = exc.file + ": "
            refused.append((exc.file, exc.message[len(prefix):] if exc.message.startswith(prefix) else exc.message))
            return None

    if key_of is not None and not refused:
        check(lambda: check_blob_names(files, key_of))
    by_path = {f.path: f for f in files}
    insight: list[KeyValuePair] = []
    if layout.out_meta.is_symlink() or layout.out_meta.is_file():
        def read_insight() -> list[KeyValuePair]:
            _check_inside_out(layout, layout.out_meta, "out/meta.json")
            return read_pairs(layout.out_meta, "out/meta.json", MAX_INSIGHT_BYTES, empty_ok=True, limit=INSIGHT_LIMIT)
        insight = check(read_insight) or []
    events: list[PlannedEvent] = []
    if layout.out_events.is_dir():
        for entry in sorted(layout.out_events.iterdir()):
            planned = check(lambda: _read_event(layout, entry, valid_event_types, max_event_bytes, by_path))
            if planned is not None:
                events.append(planned)
    if len(refused) == 1 and raised:
        raise raised[0]  # as it was raised: its key kept
    if refused:
        raise InputError.listing(refused, OUT_RULE if stray else "")
    return DonePlan(files=files, insight=insight, events=events)


def _read_event(layout: ModuleLayout, entry: Path, valid_event_types: list[str], max_event_bytes: int,
                outputs: dict[str, OutputFile]) -> PlannedEvent:
    """Read and validate the event file ``entry`` of ``out/events``.

    Raises:
        InputError: naming the file (and key).
    """
    where = layout.name(entry)
    if entry.suffix != ".json" or not (entry.is_file() or entry.is_symlink()):
        # Refused, not skipped: a misnamed event file dropped in silence is a child never notified.
        raise InputError(where, "is not an event file: out/events holds only *.json files, one event each "
                                "(rename it or remove it)")
    if text_problem(entry.name):
        raise InputError(where, "the file name is not valid UTF-8")
    _check_inside_out(layout, entry, where)
    if not entry.is_file():  # a link inside out/ to a folder (read: a 500) or a FIFO (read: a hang)
        raise InputError(where, "is not an event file: it links to something that is not a file")
    pairs = read_pairs(entry, where, max_event_bytes, empty_ok=False, limit=EVENT_LIMIT)
    return _plan_event(entry.name, where, pairs, valid_event_types, outputs)


# The entries of out/ in the folder contract (DESIGN.md, Folder contract; spec: Data Handling).
OUT_ENTRIES = ("data", "meta.json", "events")
OUT_RULE = ("out/ holds only data/ for output files, meta.json for insights and events/ for *.json event files "
            "(hidden files are refused too): move each into its place or remove it, then call /done again")


def _stray_out_entries(layout: ModuleLayout) -> list[tuple[str, str]]:
    """Every entry directly under ``out/`` that is not in the folder contract (:data:`OUT_ENTRIES`), as
    ``(name, problem)`` sorted by name: committed as nothing, it would be dropped behind a 200. A name
    close to an expected one (``Events``, ``event``, ``meta.JSON``, ``meta.json.tmp``) gets a hint."""
    try:
        names = sorted(os.listdir(layout.basedir / "out"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    stray = []
    for name in names:
        if name in OUT_ENTRIES:
            continue
        path = layout.basedir / "out" / name
        folded = name.strip(". ").casefold()  # Events, .events, meta.JSON
        guess = difflib.get_close_matches(folded, OUT_ENTRIES, n=1, cutoff=0.6)  # event, meta.json.tmp
        hint = f" (did you mean out/{guess[0]}?)" if guess else ""
        folder = "/" if path.is_dir() and not path.is_symlink() else ""
        stray.append((f"out/{name}{folder}", f"is not part of the folder contract{hint}"))
    return stray


def check_event_meta_sizes(plan: DonePlan, key_of: Callable[[str], str]) -> None:
    """Refuse, before anything is committed, an event whose child event meta would not fit in a
    document (:data:`MAX_DOCUMENT_BYTES`). The meta holds the event's pairs and, per listed file, its
    path, blob key, size, MD5 and URL; the last two are bounded by an allowance, so the estimate is
    the same whichever providers are enabled.

    Raises:
        InputError: naming the event file and key ``files``.
    """
    for planned in plan.events:
        pairs = json.dumps([p.model_dump() for p in planned.data], ensure_ascii=False).encode("utf-8")
        size = len(pairs) + 1024  # ids, type, producer and field names
        for path in planned.files:
            key = key_of(path)
            size += len(path.encode("utf-8")) + 3 * len(key.encode("utf-8")) + _FILE_ENTRY_ALLOWANCE
        if size > MAX_DOCUMENT_BYTES:
            raise InputError(f"out/events/{planned.file}",
                             f"its event meta would take about {size} bytes, over the {MAX_DOCUMENT_BYTES} bytes "
                             f"a document may hold (Cosmos DB); list fewer files ({len(planned.files)} listed)",
                             key="files")


def _check_inside_out(layout: ModuleLayout, path: Path, where: str) -> None:
    """Refuse a link (out/meta.json, an event file) that leads outside ``out/``: the sidecar would read
    a file of its own container, not the module's."""
    if path.is_symlink():
        real_out = os.path.realpath(layout.basedir / "out")
        try:
            real = os.path.realpath(path, strict=True)
        except OSError:
            raise InputError(where, "is a link to nothing, or a symlink loop") from None
        if not inside(real_out, real):
            raise InputError(where, "is a link that points outside out/")


def _plan_event(
    name: str, where: str, pairs: list[KeyValuePair], valid: list[str], outputs: dict[str, OutputFile]
) -> PlannedEvent:
    for required in ("eventType", "files"):
        if sum(p.key == required for p in pairs) > 1:
            raise InputError(where, "appears more than once", key=required)
    event_type = next((p.value for p in pairs if p.key == "eventType"), None)
    if event_type is None:
        near = [p.key for p in pairs if _key_fold(p.key) in _NEAR_EVENT_TYPE]
        hint = f" (did you mean 'eventType'? the file has '{near[0]}'; keys are case-sensitive)" if near else ""
        raise InputError(where, f"required key is missing{hint}", key="eventType")
    if not any(p.key == "files" for p in pairs):
        # Passed on as event data, a misspelt "files" would send the child none of the files it names.
        # "Files", "FILES", "file_s" always; "file" (a fair data key) when it names an output file.
        near = [p.key for p in pairs if _key_fold(p.key) == "files" or (
            _key_fold(p.key) == "file" and any(n.strip() in outputs for n in p.value.split(",")))]
        if near:
            raise InputError(where, "did you mean 'files'? Only the key 'files' (lower case) lists the output files "
                                    "passed on to the child; rename it (other keys are passed on as event data)",
                             key=near[0])
    if event_type not in valid:
        allowed = ", ".join(valid) if valid else "none: --valideventtypes is empty"
        raise InputError(where, f"event type '{event_type}' is not a valid event type ({allowed})", key="eventType")
    files_value = next((p.value for p in pairs if p.key == "files"), "")
    return PlannedEvent(
        file=name,
        event_type=event_type,
        files=_event_files(files_value, where, outputs),
        data=[p for p in pairs if p.key not in ("eventType", "files")],
    )
