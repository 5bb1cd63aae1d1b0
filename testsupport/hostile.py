"""The hostile-input corpus: names, paths, encodings, links, sizes and JSON shapes a module (or another
module's sidecar) can hand the sidecar, each with its expected answer.

Every case is run unchanged against the development providers and against the real ones (Azurite,
nx-27017, the AMQP 1.0 peer) by ``test_hostile.py``; both must give the same status naming the same
file and key, and a refused case must commit nothing. The rules behind the answers are in
``sidecar/paths.py`` and the README's folder contract.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from flows.runtime import Runtime
from sidecar.cli import compose_config
from sidecar.dataplane import DataPlane, build_dataplane
from sidecar.layout import remove_tree
from testsupport.processes import SECRET
from testsupport.stack import Stack

T = TypeVar("T")

GOOD = "good.txt"
# The provider sets every case runs against (``Plane``; the fixture ``plane`` in tests/hostile/conftest.py).
KINDS = ["dev", "real"]


class Plane:
    """One provider set: the development providers under ``root/.dev``, or the real stack."""

    def __init__(self, kind: str, root: Path, stack: Stack | None):
        self.kind, self.root, self.stack = kind, root, stack

    def runtime(self, event_id: str, name: str = "mod", parent: str = "", extra: tuple[str, ...] = ()) -> Runtime:
        flags = self.stack.seed_flags() if self.stack else ["--development=true"]
        cfg, _ = compose_config(flags + [*extra,
            f"--context.eventid={event_id}", "--context.correlationid=corr-hostile", f"--context.name={name}",
            f"--context.parenteventid={parent}", "--valideventtypes=file_discovered", f"--sharedsecret={SECRET}",
            f"--basedir={self.root / name}", f"--devdir={self.root / '.dev'}", "--transfer.retries=0",
        ])
        return Runtime.for_config(cfg)

    def committed(self, event_id: str) -> object:
        """What the data plane holds that a run of ``event_id`` could have written."""
        if self.stack is None:
            dev = self.root / ".dev"
            return sorted(str(p.relative_to(dev)) for p in dev.rglob("*")) if dev.exists() else []
        topic = self.stack.peer.topics[self.stack.topic]
        return (sorted(self.stack.blobs(f"{event_id}/")),
                sorted(m["_id"] for m in self.stack.documents() if m.get("parentEventId") == event_id),
                sorted(d["_id"] for d in self.stack.documents("_insights") if d.get("eventId") == event_id),
                len(topic.seen_ids) + topic.duplicates)


def files_under(root: Path) -> set[str]:
    """Every file and link under ``root`` (relative, as bytes-safe text)."""
    found = set()
    for folder, dirs, names in os.walk(root):
        found.update(os.path.relpath(os.path.join(folder, n), root) for n in dirs + names
                     if not os.path.isdir(os.path.join(folder, n)) or os.path.islink(os.path.join(folder, n)))
    return found


def on_own_dataplane(runtime: Runtime, work: Callable[[DataPlane], Awaitable[T]]) -> T:
    """``work`` done by a data plane of its own, as another sidecar would: the app's providers live on
    the TestClient's event loop, which this thread cannot await, and pymongo's client belongs to the
    loop that made it (awaiting the app's store here swapped its client and left the old one open)."""

    async def run() -> T:
        plane = build_dataplane(runtime.cfg)
        try:
            return await work(plane)
        finally:
            await plane.close()

    return asyncio.run(run())


@dataclass(frozen=True)
class DoneCase:
    """Outputs written by ``write(out)`` beside a good file and event; ``/done`` must answer 400 whose
    message starts with ``file`` (as shown: undecodable bytes as ``\\xe9``) and holds ``detail``."""

    id: str
    write: Callable[[Path], None]
    file: str
    detail: str


def data(out: Path, name: str | bytes, content: bytes = b"x" * 100) -> None:
    """Write ``out/data/{name}`` (``bytes``: a name that need not be UTF-8), folders included."""
    target = os.path.join(os.fsencode(out / "data"), name if isinstance(name, bytes) else os.fsencode(name))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(content)


def link(out: Path, name: str, target: str | Path) -> None:
    """Make ``out/data/{name}`` a symlink to ``target`` (as given: relative targets stay relative)."""
    path = out / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def event(out: Path, name: str | bytes, raw: str | bytes) -> None:
    """Write the event file ``out/events/{name}`` (``bytes``: a name that need not be UTF-8) holding
    ``raw`` (text is written as UTF-8)."""
    folder = os.fsencode(out / "events")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name if isinstance(name, bytes) else os.fsencode(name)), "wb") as f:
        f.write(raw if isinstance(raw, bytes) else raw.encode("utf-8"))


def nest(folder: Path, names: list[str]) -> None:
    """Folders ``names[0]/names[1]/...`` below ``folder`` and a file at the bottom, however deep or long
    (made one level at a time from a descriptor of the level above, so no path reaches PATH_MAX)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def event_in(folder: Path) -> None:
    """A good event file ``a.json`` in ``folder`` (to misplace it)."""
    (folder / "a.json").write_text(pairs(("eventType", "file_discovered"), ("files", GOOD)))


def pairs(*kv: tuple[str, str]) -> str:
    """A KeyValuePairs array as JSON text; ``ensure_ascii`` keeps lone surrogates as ``\\ud800``."""
    return json.dumps([{"key": k, "value": v} for k, v in kv])


# Every name a refused_name case below refuses: (name, shown, detail). The blob store refuses the
# same names as keys (tests/conformance), so one list serves both.
REFUSED_NAMES: list[tuple[str | bytes, str, str]] = []


def refused_name(case_id: str, name: str | bytes, shown: str, detail: str) -> DoneCase:
    """The case of an output file named ``name`` that /done refuses (``shown`` as the message shows
    it, with ``detail``); the name is also listed in :data:`REFUSED_NAMES` for the blob store's keys."""
    REFUSED_NAMES.append((name, shown, detail))
    return DoneCase(case_id, lambda out: data(out, name), f"out/data/{shown}", detail)


def reset_outputs(out: Path) -> None:
    """Fresh ``out/``: one good file and one good event that would be committed if nothing were refused."""
    if out.exists():
        remove_tree(out)  # shutil.rmtree recurses once per level: a case's deep tree would raise RecursionError
    (out / "events").mkdir(parents=True)
    data(out, GOOD, b"good")
    event(out, "0-good.json", pairs(("eventType", "file_discovered"), ("files", GOOD)))


def _outside(out: Path) -> Path:
    secret = out.parent.parent / "host_secret.txt"
    secret.write_text("not the module's")
    return secret


DONE_CASES: list[DoneCase] = [
    # Names the blob store would alter or merge (issue 9, item 1 and its family).
    DoneCase("backslash-merges", lambda out: (data(out, "x\\y.txt", b"1" * 100), data(out, "x/y.txt", b"2" * 50)),
             "out/data/x\\y.txt", "turns into '/'"),
    refused_name("trailing-dot", "report.", "report.", "ending with '.'"),
    refused_name("folder-trailing-dot", "v1./a.txt", "v1.", "ending with '.'"),
    refused_name("control-tab", "tab\there.txt", "tab\\there.txt", "control character U+0009"),
    refused_name("control-c1", "nel\x85.txt", "nel\\x85.txt", "control character U+0085"),
    refused_name("noncharacter-ffff", "x\uffff.txt", "x\\uffff.txt", "noncharacter"),
    refused_name("private-use", "x\ue000.txt", "x\\ue000.txt", "private-use"),
    # Too deep or too long: refused at the folder below which no name can be a blob name (not walked further).
    replace(refused_name("too-many-segments", "/".join(["d"] * 260) + "/f.txt", "/".join(["d"] * 260) + "/f.txt",
                         "path segments"),
            file="out/data/" + "/".join(["d"] * 254) + ": is a folder no file below which", detail="255 path segments"),
    replace(refused_name("too-long", "/".join(["n" * 200] * 6) + "/f.txt", "/".join(["n" * 200] * 6) + "/f.txt",
                         "characters long"),
            file="out/data/" + "/".join(["n" * 200] * 6) + ": is a folder no file below which",
            detail="1207 characters long"),
    # Names that are not UTF-8 (issue 9, item 2): a Latin-1 byte, a CESU-8 surrogate, a lone continuation.
    refused_name("latin1-byte", b"caf\xe9.txt", "caf\\xe9.txt", "not valid UTF-8"),
    refused_name("encoded-surrogate", b"s\xed\xa0\x80.txt", "s\\xed\\xa0\\x80.txt", "not valid UTF-8"),
    refused_name("invalid-utf8-folder", b"dir\xff/inner.txt", "dir\\xff", "not valid UTF-8"),
    # Links (issue 9, items 4 and 5): loops, cycles, outside, nothing, special files.
    DoneCase("symlink-self-loop", lambda out: link(out, "loop", "loop"), "out/data/loop", "symlink loop"),
    DoneCase("symlink-two-loop", lambda out: (link(out, "a", "b"), link(out, "b", "a")), "out/data/a", "symlink loop"),
    DoneCase("folder-link-cycle", lambda out: link(out, "sub/up", ".."), "out/data/sub/up", "a cycle"),
    DoneCase("file-link-outside", lambda out: link(out, "leak.txt", _outside(out)), "out/data/leak.txt",
             "points outside out/data"),
    DoneCase("folder-link-outside", lambda out: link(out, "etc", "/etc"), "out/data/etc", "points outside out/data"),
    DoneCase("relative-link-outside", lambda out: link(out, "up", "../events"), "out/data/up",
             "points outside out/data"),
    DoneCase("dangling-link", lambda out: link(out, "gone.txt", "nowhere.txt"), "out/data/gone.txt", "link to nothing"),
    DoneCase("fifo", lambda out: os.mkfifo(out / "data" / "pipe"), "out/data/pipe", "neither a file nor a folder"),
    # A socket file (as a server leaves one; mknod needs no privilege for it, unlike bind's 108-byte path).
    DoneCase("socket", lambda out: os.mknod(out / "data" / "s.sock", stat.S_IFSOCK | 0o600), "out/data/s.sock",
             "neither a file nor a folder"),
    # Folders with no file below them: a blob store holds files only, so the child would never see them.
    DoneCase("data-empty-folder", lambda out: (out / "data" / "results").mkdir(), "out/data/results/",
             "a folder with no file in it"),
    DoneCase("data-nested-empty-folders", lambda out: (out / "data" / "a" / "b" / "c").mkdir(parents=True),
             "out/data/a/: is a folder with no file", "remove it, or put a file in it"),
    DoneCase("data-link-to-empty-folder", lambda out: ((out / "data" / "e").mkdir(), link(out, "l", "e")),
             "out/data/e/", "out/data/l/: is a folder with no file"),
    # Anything directly under out/ but data/, meta.json and events/ (README: The folder contract).
    DoneCase("out-stray-file", lambda out: (out / "result.txt").write_text("r"), "out/result.txt",
             "is not part of the folder contract. out/ holds only data/"),
    DoneCase("out-stray-folder", lambda out: ((out / "output").mkdir(), (out / "output" / "x.bin").write_bytes(b"x")),
             "out/output/", "is not part of the folder contract"),
    DoneCase("out-events-misspelt", lambda out: ((out / "event").mkdir(), event_in(out / "event")),
             "out/event/", "did you mean out/events?"),
    DoneCase("out-events-case", lambda out: ((out / "Events").mkdir(), event_in(out / "Events")),
             "out/Events/", "did you mean out/events?"),
    DoneCase("out-data-case", lambda out: ((out / "Data").mkdir(), (out / "Data" / "x.bin").write_bytes(b"x")),
             "out/Data/", "did you mean out/data?"),
    DoneCase("out-meta-case", lambda out: (out / "meta.JSON").write_text("[]"), "out/meta.JSON",
             "did you mean out/meta.json?"),
    DoneCase("out-meta-left-tmp", lambda out: (out / "meta.json.tmp").write_text("[]"), "out/meta.json.tmp",
             "did you mean out/meta.json?"),
    DoneCase("out-hidden-file", lambda out: (out / ".DS_Store").write_bytes(b"\0"), "out/.DS_Store",
             "hidden files are refused too"),
    DoneCase("out-stray-link", lambda out: os.symlink("data", out / "data2"), "out/data2", "not part of the folder"),
    DoneCase("out-every-stray-named", lambda out: ((out / "b.txt").write_text("b"), (out / "a.txt").write_text("a"),
                                                   (out / "data" / "empty").mkdir()),
             "out/a.txt", "; out/b.txt: is not part of the folder contract; out/data/empty/: is a folder"),
    DoneCase("event-link-outside", lambda out: os.symlink(_outside(out), out / "events" / "z.json"),
             "out/events/z.json", "points outside out/"),
    DoneCase("out-data-is-a-link", lambda out: (os.rename(out / "data", out / "real"), os.symlink("/etc", out / "data")),
             "out/data", "is a link"),
    # Strings that are not valid Unicode (issue 9, item 3): lone surrogates from legal JSON escapes.
    DoneCase("event-value-surrogate", lambda out: event(out, "bad.json", pairs(("eventType", "file_discovered"),
                                                                               ("note", "bad \ud800 half"))),
             "out/events/bad.json: key 'note'", "lone surrogate U+D800"),
    DoneCase("event-key-surrogate", lambda out: event(out, "bad.json", pairs(("eventType", "file_discovered"),
                                                                             ("k\udfff", "v"))),
             "out/events/bad.json: key 'k\\udfff'", "lone surrogate U+DFFF"),
    DoneCase("insight-surrogate", lambda out: (out / "meta.json").write_text(pairs(("note", "x\udbff"))),
             "out/meta.json: key 'note'", "lone surrogate U+DBFF"),
    # Names and strings quoted in a message are shown escaped (sidecar.paths.shown), never raw.
    DoneCase("event-type-unprintable", lambda out: event(out, "bad.json", pairs(("eventType", "file\u202edetected\ue000\x1b"))),
             "out/events/bad.json: key 'eventType'", "event type 'file\\u202edetected\\ue000\\x1b' is not"),
    DoneCase("out-stray-bidi-name", lambda out: (out / "x\u202etxt.exe").write_text("x"), "out/x\\u202etxt.exe",
             "not part of the folder contract"),
    DoneCase("event-file-name-latin1", lambda out: event(out, b"ev\xe9.json", pairs(("eventType", "file_discovered"))),
             "out/events/ev\\xe9.json", "not valid UTF-8"),
    # Encodings and JSON shapes.
    DoneCase("event-invalid-utf8", lambda out: event(out, "bad.json", b'[{"key": "eventType", "value": "\xff"}]'),
             "out/events/bad.json", "malformed JSON"),
    # CESU-8 (Java's modified UTF-8): a character beyond U+FFFF as two encoded surrogate halves.
    DoneCase("event-cesu8-surrogate", lambda out: event(out, "bad.json", b'[{"key": "eventType", "value": '
                                                                          b'"file_discovered"}, {"key": "e", "value": "\xed\xa0\xbd\xed\xb8\x80"}]'),
             "out/events/bad.json: malformed JSON: not valid UTF-8: bytes ED A0 BD at byte 74 encode U+D83D",
             "CESU-8"),
    DoneCase("insight-duplicate-value", lambda out: (out / "meta.json").write_text('[{"key": "a", "value": "1", "value": "2"}]'),
             "out/meta.json: item 0", '"value" is given 2 times'),
    # An item giving thousands of names twice: told in a few lines (the first 5 names), found in one pass
    # (counting each name over all members was quadratic: 20,000 names, 15 s; a 2 MiB insight, ~30 min).
    DoneCase("insight-many-names-repeated", lambda out: (out / "meta.json").write_text(
        "[{" + ",".join(f'"n{i}": "a", "n{i}": "b"' for i in range(3000)) + "}]"),
        'out/meta.json: item 0: "n0" is given 2 times ("a", "b"); "n1"', "; and 2995 more names given more than once"),
    DoneCase("event-deep-nesting", lambda out: event(out, "bad.json", "[" * 100_000 + "]" * 100_000),
             "out/events/bad.json", "nested too deeply"),
    DoneCase("event-not-json-suffix", lambda out: event(out, "e1.txt", pairs(("eventType", "file_discovered"))),
             "out/events/e1.txt", "is not an event file"),
    DoneCase("event-folder", lambda out: (out / "events" / "sub.json").mkdir(),
             "out/events/sub.json", "is not an event file"),
    DoneCase("event-link-to-folder", lambda out: os.symlink("../data", out / "events" / "sub.json"),
             "out/events/sub.json", "is not an event file"),
    DoneCase("out-data-is-a-file", lambda out: (shutil.rmtree(out / "data"), (out / "data").write_text("x")),
             "out/data", "is not a folder"),
    DoneCase("out-events-is-a-file", lambda out: (shutil.rmtree(out / "events"), (out / "events").write_text("x")),
             "out/events", "is not a folder"),
    DoneCase("insight-is-a-folder", lambda out: (out / "meta.json").mkdir(), "out/meta.json", "is not a file"),
    DoneCase("event-null", lambda out: event(out, "bad.json", "null"), "out/events/bad.json", "got NoneType"),
    DoneCase("event-nan", lambda out: event(out, "bad.json", '[{"key": "eventType", "value": NaN}]'),
             "out/events/bad.json", "item 0"),
    DoneCase("insight-object", lambda out: (out / "meta.json").write_text('{"key": "a", "value": "b"}'),
             "out/meta.json", "got dict"),
    # Paths listed in an event's files.
    DoneCase("files-dotdot", lambda out: event(out, "bad.json", pairs(("eventType", "file_discovered"), ("files", "x/../../etc/passwd"))),
             "out/events/bad.json: key 'files'", "escapes out/data"),
    DoneCase("files-absolute", lambda out: event(out, "bad.json", pairs(("eventType", "file_discovered"), ("files", "/etc/passwd"))),
             "out/events/bad.json: key 'files'", "absolute path"),
    # 'link/../b' read lexically named out/data/b, while the module's path (link -> sub/inner) names sub/b: the
    # child was sent another file than the one the module listed, behind a 200 (hostile trial 6).
    DoneCase("files-dotdot-through-a-link", lambda out: (
        data(out, "sub/inner/x.txt", b"x"), data(out, "sub/b", b"the file the module means"),
        data(out, "b", b"the file sent before"), link(out, "link", "sub/inner"),
        event(out, "bad.json", pairs(("eventType", "file_discovered"), ("files", "link/../b")))),
        "out/events/bad.json: key 'files'", "'link/../b' has a '..' segment"),
    # Sizes.
    DoneCase("event-too-large", lambda out: event(out, "bad.json", pairs(("eventType", "file_discovered"), ("pad", "x" * 300_000))),
             "out/events/bad.json", "over the limit"),
    DoneCase("event-meta-too-large", lambda out: (
        [data(out, f"many/{i:05d}", b"") for i in range(4000)],
        event(out, "big.json", pairs(("eventType", "file_discovered"), ("files", ",".join(f"many/{i:05d}" for i in range(4000)))))),
        "out/events/big.json: key 'files'", "over the 2097152 bytes"),
    DoneCase("insight-too-large", lambda out: (out / "meta.json").write_text(pairs(("pad", "x" * (2 * 1024 * 1024)))),
             "out/meta.json", "over the limit"),
    # Numbers Python's JSON reader will not convert (more than 4,300 digits: CVE-2020-10735): a ValueError
    # that is not a JSONDecodeError, which passed /done as a 500 (hostile trial 6).
    DoneCase("event-number-too-long", lambda out: event(out, "bad.json", '[{"key": "eventType", "value": "file_discovered"}, '
                                                                        '{"key": "n", "value": 1' + "0" * 5000 + "}]"),
             "out/events/bad.json: malformed JSON: a number too long to read", "5001 digits"),
    DoneCase("insight-number-too-long", lambda out: (out / "meta.json").write_text("[" + "9" * 4301 + "]"),
             "out/meta.json: malformed JSON: a number too long to read", "4301 digits"),
    # Trees no blob name can come from, refused at the folder where names get too long, not walked:
    # a thousand folders deep (the walk, a recursion, raised RecursionError: a 500), and longer than
    # PATH_MAX (4,096 bytes: the walk's full paths raised ENAMETOOLONG, a 500) (hostile trial 6).
    DoneCase("data-tree-too-deep", lambda out: nest(out / "data", ["d"] * 1100),
             "out/data/" + "d/" * 253 + "d: is a folder no file below which can be committed", "has 255 path segments"),
    DoneCase("data-tree-past-path-max", lambda out: nest(out / "data", ["n" * 200] * 22),
             "out/data/" + "/".join(["n" * 200] * 6) + ": is a folder no file below", "characters long"),
]


# The cases driven through the app against both provider sets: one or two of each family (each costs a
# flow run, about a second on a loaded machine). Every case of DONE_CASES and READY_CASES also runs in
# test_rules.py against the validation itself, which takes milliseconds.
HTTP_DONE = {
    "backslash-merges", "trailing-dot", "control-tab", "noncharacter-ffff", "private-use", "too-many-segments",
    "too-long", "latin1-byte", "invalid-utf8-folder", "symlink-two-loop", "folder-link-cycle", "file-link-outside",
    "dangling-link", "fifo", "event-link-outside", "event-value-surrogate", "insight-surrogate",
    "event-file-name-latin1", "event-deep-nesting", "event-nan", "files-dotdot", "files-dotdot-through-a-link",
    "event-meta-too-large",
    "event-too-large", "event-not-json-suffix", "event-type-unprintable", "data-empty-folder", "out-events-case",
    "out-stray-file", "event-number-too-long", "insight-many-names-repeated", "data-tree-past-path-max",
}


# Names every provider keeps as they are: committed, then staged by the child byte for byte. Those
# with a comma or a blank at either end cannot be listed in an event's files (the list is split on
# commas and stripped), so they are committed but passed on only by the listable ones.
ODD_NAMES = [
    "a b.txt", "100%.txt", "%41%2F.txt", "q?x=1.txt", "h#frag.txt", "plus+sign.txt", "semi;colon.txt",
    "quote'\"`.txt", "amp&eq=at@bang!.txt", "[brackets]{braces}(parens).txt", "$dollar${x}.txt",
    "~tilde^caret|pipe<lt>gt.txt", ".hidden", "..dots.txt", "café-nfc.txt", "cafe\u0301-nfd.txt",
    "emoji-😀.txt", "中文/日本語/한국어.txt", "rtl-שלום.txt", "zero\u200bwidth.txt", "Case.txt", "case.txt",
    "deep/" * 20 + "leaf.txt", "n" * 251 + ".txt",
]
UNLISTABLE_NAMES = ["comma,name.txt", " leading.txt", "trailing.txt "]
# Pair values every provider stores as they are.
ODD_VALUES = {
    "nul": "a\x00b", "controls": "\t\n\r\x1b\x7f\x85", "astral": "😀𝄞", "noncharacter": "\uffff\ufdd0",
    "interpolation": "${oc.env:HOME}", "backslashes": "C:\\dir\\file", "rtl": "שלום", "empty": "",
    "json": '{"key": "value"}', "long": "y" * 10_000,
}


@dataclass(frozen=True)
class ReadyCase:
    """An event meta written by someone else listing ``files`` (``(path, key)`` pairs); ``/ready``
    must answer 502 naming the event meta and ``what`` ('path' or 'blob key') ``shown``, with
    ``detail``, and stage nothing."""

    id: str
    files: list[tuple[str, str]]
    what: str
    shown: str
    detail: str


READY_CASES: list[ReadyCase] = [
    ReadyCase("path-empty", [("", "p/m/a.txt")], "path", "", "is empty"),
    ReadyCase("path-dot", [(".", "p/m/a.txt")], "path", ".", "'.' path segment"),
    ReadyCase("path-dotdot-inside", [("x/..", "p/m/a.txt")], "path", "x/..", "'..' path segment"),
    ReadyCase("path-escape", [("../../escape.txt", "p/m/a.txt")], "path", "../../escape.txt", "'..' path segment"),
    ReadyCase("path-absolute", [("/tmp/abs.txt", "p/m/a.txt")], "path", "/tmp/abs.txt", "absolute path"),
    ReadyCase("path-double-slash", [("a//b.txt", "p/m/a.txt")], "path", "a//b.txt", "empty path segment"),
    ReadyCase("path-trailing-slash", [("a/", "p/m/a.txt")], "path", "a/", "empty path segment"),
    ReadyCase("path-backslash", [("a\\b.txt", "p/m/a.txt")], "path", "a\\b.txt", "turns into '/'"),
    ReadyCase("path-nul", [("a\x00b.txt", "p/m/a.txt")], "path", "a\\x00b.txt", "control character U+0000"),
    ReadyCase("path-trailing-dot", [("a.", "p/m/a.txt")], "path", "a.", "ending with '.'"),
    ReadyCase("key-escape", [("ok.txt", "../../host_secret.txt")], "blob key", "../../host_secret.txt", "'..' path segment"),
    ReadyCase("key-absolute", [("ok.txt", "/etc/hostname")], "blob key", "/etc/hostname", "absolute path"),
    ReadyCase("key-empty", [("ok.txt", "")], "blob key", "", "is empty"),
    ReadyCase("paths-duplicate", [("same.txt", "p/m/a.txt"), ("same.txt", "p/m/b.txt")], "path", "same.txt", "collides"),
    ReadyCase("paths-file-and-folder", [("a", "p/m/a.txt"), ("a/b.txt", "p/m/b.txt")], "path", "a/b.txt",
              "collides with 'a'"),
]

HTTP_READY = {"path-empty", "path-dot", "path-escape", "path-absolute", "path-backslash", "key-escape",
              "paths-duplicate", "paths-file-and-folder"}
