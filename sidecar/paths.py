"""Names and strings that cross the boundary: the one rule for every path and blob key.

``DESIGN.md`` (Names and strings that cross the boundary): everything ``/done`` sends is checked before
the first write, and on ``/ready`` the paths and keys read from an event meta are confined by the same
helper. A name is a relative POSIX path (segments separated by ``/``): a file under ``out/data``, the
``files[].path`` of an event meta, or a blob key. It is accepted only if every blob store keeps it as
it is, so a module that passes in development mode passes in production.

The rules come from Azure Storage's "Naming and Referencing Containers, Blobs, and Metadata" (a blob
name is 1 to 1,024 characters and at most 254 path segments; reserved URL characters are escaped by the
client; code points that are not valid Unicode characters, such as lone surrogates, U+E000 and
control characters 0x00-0x1F and U+0081, are not allowed; avoid names ending with a dot or a slash;
``\\`` is turned into ``/``), from what the service and its clients are known to do with the rest
(rclone's azureblob encoder escapes exactly control characters, DEL, ``\\``, a trailing ``.`` and
invalid UTF-8; URL paths collapse ``.`` and ``..`` segments and ``//``), and from the module's own
volume (a name that ``os.fsdecode`` could not decode as UTF-8 holds lone surrogates).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

# Azure Storage: a blob name is at most 1,024 characters (counted here in UTF-16 code units, as the
# service's .NET front end counts them, so a name of astral characters is not under-counted) and has
# at most 254 path segments.
MAX_BLOB_NAME_CHARS = 1024
MAX_BLOB_SEGMENTS = 254
# Linux and most file systems: one path segment (a file or folder name) is at most 255 bytes.
MAX_SEGMENT_BYTES = 255


def shown(text: str) -> str:
    """``text`` made safe to print, log and send as JSON, and readable: the one rule for every name and
    string quoted in an error message (``sidecar.errors.SidecarError`` applies it to each message) and
    in a log line (``sidecar.logs.RunFormatter``).

    Escaped: bytes that were not UTF-8 (surrogate escapes from ``os.fsdecode``) as ``\\xe9``, and every
    character Python's ``str.isprintable`` calls unprintable, as ``repr`` escapes it (``\\n``,
    ``\\x85``, ``\\u202e``, ``\\U000f0000``): control characters, format characters (bidi overrides
    such as U+202E that reorder the text around them, zero-width characters, U+FEFF), lone surrogates,
    private-use code points (U+E000), noncharacters and unassigned code points (U+FFFE, U+FFFF) and
    separators other than the ASCII space. Printable text, ``/`` and non-ASCII letters and emoji are
    kept as they are; a backslash too, so applying the rule twice changes nothing.
    """
    if text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as a string (UTF-8 in BSON, JSON and AMQP), or None.

    The only such strings are those holding lone surrogates (U+D800-U+DFFF): a JSON escape such as
    ``"\\ud800"`` decodes to one, and pymongo, httpx and the AMQP encoder all refuse to encode it.
    """
    for i, ch in enumerate(text):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"is not valid Unicode: lone surrogate U+{ord(ch):04X} at character {i}"
    return None


# Every code point _char_problem refuses, for one quick search per segment (most names have none).
_BAD_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff\ufdd0-\ufdef\ue000-\uf8ff\U000f0000-\U0010ffff"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)) + "]")


def _char_problem(ch: str) -> str | None:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"is not valid UTF-8 (byte \\x{code - 0xDC00:02x})"
    if 0xD800 <= code <= 0xDFFF:
        return f"is not valid Unicode (lone surrogate U+{code:04X})"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"holds control character U+{code:04X}, which blob names cannot hold"
    if ch == "\\":
        return "holds '\\', which Azure Storage turns into '/' (a different name)"
    if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
        return f"holds U+{code:04X}, a Unicode noncharacter, which blob names cannot hold"
    if 0xE000 <= code <= 0xF8FF or code >= 0xF0000:
        return f"holds U+{code:04X}, a private-use code point, which blob names cannot hold"
    return None


def segment_problem(segment: str) -> str | None:
    """Why ``segment`` (one file or folder name, no ``/``) cannot be part of a blob name, or None."""
    if segment == "":
        return "has an empty path segment ('//', or '/' at either end), which URLs collapse"
    if segment in (".", ".."):
        return f"has a '{segment}' path segment, which URLs collapse"
    if "/" in segment:
        return "holds '/', which separates the segments of a blob name"
    bad = _BAD_CHAR.search(segment)
    if bad:
        return _char_problem(bad.group())
    if segment.endswith("."):
        return "has a name ending with '.', which Azure Storage drops (a different name)"
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        return f"has a path segment over {MAX_SEGMENT_BYTES} bytes"
    return None


def name_problem(name: str) -> str | None:
    """Why the relative POSIX path ``name`` is not a name every blob store keeps as it is, or None.

    Refused: empty names, absolute paths, empty, ``.`` and ``..`` segments, segments ending with ``.``,
    ``\\``, control characters (C0, DEL, C1), lone surrogates (bytes that were not UTF-8),
    noncharacters, private-use code points, segments over 255 bytes, more than 254 segments or more
    than 1,024 characters. Everything else (blanks, ``%``, ``#``, ``?``, ``+``, quotes, any letter or
    emoji) is kept as is by every provider.
    """
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "is an absolute path"
    segments = name.split("/")
    for segment in segments:
        problem = segment_problem(segment)
        if problem:
            return problem
    if len(segments) > MAX_BLOB_SEGMENTS:
        return f"has {len(segments)} path segments; a blob name has at most {MAX_BLOB_SEGMENTS}"
    chars = len(name.encode("utf-16-le")) // 2
    if chars > MAX_BLOB_NAME_CHARS:
        return f"is {chars} characters long; a blob name has at most {MAX_BLOB_NAME_CHARS}"
    return None


def collisions(names: Iterable[str], fold: Callable[[str], str] | None = None) -> list[tuple[str, str]]:
    """Pairs of names that cannot live side by side as files: the same name twice, or a name that is
    also a folder of another (``a`` and ``a/b``). Every file system and blob store would merge them.

    Args:
        names: ``/``-separated relative names.
        fold: how a file system compares names (:func:`name_folding`), e.g. ``Case.txt`` and
            ``case.txt`` are one file where case is not told apart; None: byte for byte. The pairs
            name the names as given.
    """
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(fold(name) if fold else name, []).append(name)
    found = [(group[0], other) for group in by_key.values() for other in group[1:]]
    for key in sorted(by_key):
        parts = key.split("/")
        found += [(by_key[prefix][0], by_key[key][0]) for i in range(1, len(parts))
                  if (prefix := "/".join(parts[:i])) in by_key]
    return found


def name_folding(folder: Path) -> Callable[[str], str] | None:
    """How the file system holding ``folder`` compares names, found by creating one file in it: None
    when it tells every name apart byte for byte (Linux file systems, a container's volume), else a
    function mapping names it takes for one file to one key: ``str.casefold`` where it does not tell
    case apart (macOS APFS and HFS+ by default, Windows NTFS), NFD where it does not tell Unicode
    normalisation forms apart (APFS, HFS+), or both. Python's case folding is the Unicode standard's,
    close to but not exactly each file system's table, so a pair refused here may be two files there,
    never the other way round for the letters both know.

    Raises:
        OSError: the probe file cannot be created in ``folder``.
    """
    fd, path = tempfile.mkstemp(dir=folder, prefix=".sidecar-probe-Ab\u00e9-")
    try:
        name = os.path.basename(path)
        other_case = os.path.exists(os.path.join(folder, name.swapcase()))
        other_form = os.path.exists(os.path.join(folder, unicodedata.normalize("NFD", name)))
    finally:
        os.close(fd)
        os.unlink(path)
    if not other_case and not other_form:
        return None

    def fold(name: str) -> str:
        if other_case:
            name = name.casefold()
        return unicodedata.normalize("NFD", name) if other_form else name
    return fold


def inside(real_root: str, real: str) -> bool:
    """Whether the real path ``real`` (links resolved) is ``real_root`` or below it: the one
    containment test of every confinement (:func:`confine`, the links under ``out/``)."""
    return os.path.commonpath([real_root, real]) == real_root


def confine(root: Path, name: str) -> Path:
    """``root / name`` after checking that ``name`` is a good name (:func:`name_problem`) and that the
    result, links resolved, stays inside ``root``: the one confinement helper for every name read from
    outside (an event meta's paths on ``/ready``, a blob key of the development blob store).

    Raises:
        ValueError: the problem, as a phrase ("is an absolute path", "leaves the folder").
    """
    return Confinement(root)(name)


class Confinement:
    """:func:`confine` for many names below one ``root``: each folder is resolved once, not once per
    file below it, so an event meta of thousands of files costs one ``lstat`` per file and per new folder
    instead of a ``realpath`` (an ``lstat`` of every component from ``/``) per file.

    The result is the same as ``os.path.realpath`` of each name: a component that is a link is resolved
    with ``realpath`` (links to links, relative targets), every other one is appended as it is (good names
    have no ``.``/``..`` segments). Folders are remembered, so use one instance for one batch of checks
    over a tree nobody changes meanwhile (e.g. ``/ready``'s check of an event meta, before staging).

    Args:
        root: the folder names must stay in.
    """

    def __init__(self, root: Path):
        self.root = root
        self._real_root = os.path.realpath(root)
        self._real: dict[str, str] = {"": self._real_root}  # folder (relative) -> its real path

    def __call__(self, name: str) -> Path:
        """``root / name``, checked as :func:`confine` checks it.

        Raises:
            ValueError: the problem, as a phrase ("is an absolute path", "leaves the folder").
        """
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        folder, _, leaf = name.rpartition("/")
        if not inside(self._real_root, _resolved(self._folder(folder), leaf)):
            raise ValueError("leaves the folder it must stay in")
        return self.root / name

    def _folder(self, folder: str) -> str:
        real = self._real.get(folder)
        if real is None:
            parent, _, segment = folder.rpartition("/")
            real = self._real[folder] = _resolved(self._folder(parent), segment)
        return real


def _resolved(real_folder: str, segment: str) -> str:
    """The real path of ``segment`` in the real (links resolved) folder ``real_folder``."""
    path = os.path.join(real_folder, segment)
    return os.path.realpath(path) if os.path.islink(path) else path


# A file name is at most 255 bytes; a development provider adds ".json", and
# sidecar.layout.write_json_atomic writes beside it ".{name}.{8 characters}.tmp".
MAX_ID_SEGMENT = 255 - len(".json") - len("..12345678.tmp")


def id_segment(text: str) -> str:
    """``text`` (an event id, an execution id: any string) as one file or folder name that stays in its
    folder: percent-encoded with no safe character (so no ``/``), and never empty, ``.`` or ``..``.
    Used wherever a development provider names a file after an id."""
    segment = quote(text, safe="")
    if len(segment) > MAX_ID_SEGMENT:
        # An event id is up to 255 bytes and each non-ASCII byte takes three characters encoded: past
        # what fits in a file name, its first characters, "%~" (which no encoded id holds, so no other
        # id's name) and its SHA-256.
        head = segment[:100]
        head = head[: head.rfind("%")] if "%" in head[-2:] else head  # never cut an escape in two
        return f"{head}%~{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return {"": "%", ".": "%2E", "..": "%2E%2E"}.get(segment, segment)
