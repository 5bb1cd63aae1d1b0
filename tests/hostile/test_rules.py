"""The rules behind the corpus, case by case and fast (no flow runs): names (``sidecar/paths.py``),
flag values taken literally (``sidecar/cli.py``) and the shared secret (``sidecar/sharedsecret.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from flows.ready import _check_paths
from sidecar.cli import UsageError, compose_config, redacted_yaml
from sidecar.errors import DataPlaneError, InputError
from sidecar.layout import ModuleLayout, check_event_meta_sizes, plan_outputs, remove_tree
from sidecar.models import BlobFile, EventMeta
from sidecar.paths import Confinement, collisions, confine, inside, name_folding, name_problem, shown, text_problem
from sidecar.sharedsecret import matches, secret_problem
from testsupport.hostile import DONE_CASES, READY_CASES, reset_outputs
from testsupport.processes import python_env

REFUSED_NAMES = [
    ("", "is empty"), ("/abs", "absolute"), ("a//b", "empty path segment"), ("a/", "empty path segment"),
    (".", "'.' path segment"), ("a/./b", "'.' path segment"), ("..", "'..' path segment"), ("a/../b", "'..'"),
    ("x\\y", "turns into '/'"), ("end.", "ending with '.'"), ("dir./f", "ending with '.'"), ("dots..", "ending with '.'"),
    *[(f"c{chr(c)}", f"U+{c:04X}") for c in (0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1B, 0x1F, 0x7F, 0x80, 0x81, 0x85, 0x9F)],
    ("\ufffe", "noncharacter"), ("\uffff", "noncharacter"), ("\ufdd0", "noncharacter"), ("\U0001fffe", "noncharacter"),
    ("\U0010ffff", "noncharacter"), ("\ue000", "private-use"), ("\uf8ff", "private-use"), ("\U000f0000", "private-use"),
    ("caf\udce9", "not valid UTF-8 (byte \\xe9)"), ("\ud800", "lone surrogate U+D800"), ("\udfff", "lone surrogate"),
    ("n" * 256, "over 255 bytes"), ("é" * 128, "over 255 bytes"), ("/".join("d" * 255), "path segments"),
    ("/".join(["n" * 200] * 6), "characters long"), ("/".join(["😀" * 60] * 9), "characters long"),
]
GOOD_NAMES = ["a", "a b", " lead", "trail ", "100%", "%2F", "q?", "#", "+", ";", ",", "'\"`", "$", "${x}", "~", "[]{}()",
              ".hidden", "..x", "x..y", "é", "e\u0301", "😀", "中文", "a/b/c", "/".join("d" * 254), "n" * 255,
              "\u200b", "\u00a0", "\ufffd", "\U0001f600"]


@pytest.mark.parametrize("name, reason", REFUSED_NAMES, ids=[shown(n)[:30] or "empty" for n, _ in REFUSED_NAMES])
def test_names_a_blob_store_would_alter_or_refuse(name: str, reason: str) -> None:
    problem = name_problem(name)
    assert problem and reason in problem, problem
    shown(problem).encode("utf-8")  # a message about it can always be sent as JSON


@pytest.mark.parametrize("name", GOOD_NAMES, ids=range(len(GOOD_NAMES)))
def test_names_every_provider_keeps(name: str) -> None:
    assert name_problem(name) is None


def test_shown_escapes_what_cannot_be_printed_or_encoded() -> None:
    assert shown("caf\udce9/\t\x00\x85\ud800é😀") == "caf\\xe9/\\t\\x00\\x85\\ud800é😀"


@pytest.mark.parametrize("raw, escaped", [
    ("x\ue000", "x\\ue000"), ("\U000f0000", "\\U000f0000"),  # private use
    ("\ufffe\uffff\ufdd0", "\\ufffe\\uffff\\ufdd0"), ("\U0001fffe", "\\U0001fffe"),  # noncharacters
    ("evil\u202egnp.exe", "evil\\u202egnp.exe"), ("\u2066a\u2069\u200f", "\\u2066a\\u2069\\u200f"),  # bidi
    ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"), ("line\u2028sep", "line\\u2028sep"),
    ("nb\xa0sp", "nb\\xa0sp"), ("esc\x1b[31m", "esc\\x1b[31m"), ("del\x7f", "del\\x7f"),
    ("a b/ü/😀/中文/שלום", "a b/ü/😀/中文/שלום"), ("back\\slash", "back\\slash"),
])
def test_shown_escapes_every_character_that_does_not_print_as_itself(raw: str, escaped: str) -> None:
    """One rule (``str.isprintable``, as repr): what a reader cannot see, or what reorders the text
    around it, is shown as its escape; letters of any script and emoji stay; shown twice is shown once."""
    assert shown(raw) == escaped and shown(escaped) == escaped
    assert escaped.isprintable()


def test_error_messages_and_log_lines_show_names_escaped() -> None:
    """Whatever builds the message, the JSON body and the log line carry the escape, not the character."""
    import logging

    from sidecar.logs import RunFormatter

    error = InputError("out/events/\u202eevil.json", "event type 'a\ue000\ufffe' is not valid", key="k\x1b")
    assert error.message == "out/events/\\u202eevil.json: key 'k\\x1b': event type 'a\\ue000\\ufffe' is not valid"
    assert error.file == "out/events/\\u202eevil.json" and error.key == "k\\x1b"
    record = logging.LogRecord("sidecar", logging.WARNING, __file__, 1, "refused %s\nsecond line", ("x\u202e\ue000",), None)
    line = RunFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING refused x\\u202e\\ue000\nsecond line"


def test_collisions_of_names_that_would_merge() -> None:
    assert collisions(["a", "b", "a"]) == [("a", "a")]
    assert collisions(["a", "a/b/c", "x"]) == [("a", "a/b/c")]
    assert collisions(["a/b", "a/c", "ab"]) == []


def test_confine_keeps_names_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    assert confine(tmp_path / "in", "a/b.txt") == tmp_path / "in" / "a" / "b.txt"
    for bad in ("../x", "/etc/passwd", "", "a/../../x"):
        with pytest.raises(ValueError):
            confine(tmp_path / "in", bad)
    os.symlink(tmp_path, tmp_path / "in" / "up")
    with pytest.raises(ValueError, match="leaves the folder"):
        confine(tmp_path / "in", "up/x")


def test_confinement_of_many_names_agrees_with_realpath_of_each(tmp_path: Path) -> None:
    """One Confinement resolves each folder once; its verdicts must be realpath's, links of every kind
    included (inside and out, relative, chained, to files, dangling, looping)."""
    root = tmp_path / "in"
    (root / "real" / "deep").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    links = {"up": tmp_path, "away": tmp_path / "outside", "alias": root / "real", "rel": "real/deep",
             "real/back": "../..", "real/home": "..", "real/deep/file.txt": "/etc/passwd", "chain": "alias",
             "chain2": "chain/deep", "dangling": "nowhere/at/all", "loop": "loop", "real/out": "../../outside/x"}
    for name, target in links.items():
        os.symlink(target, root / name)
    names = [f"{a}/{b}".strip("/") for a in ["", *links] for b in ["x", "deep/y", "back/z", "home/w", "out"]]
    names += list(links) + ["real/deep/file.txt", "fresh/new/file"]
    confined = Confinement(root)
    for name in names * 2:  # the second pass answers from the remembered folders
        want = inside(os.path.realpath(root), os.path.realpath(root / name))
        if want:
            assert confined(name) == root / name, name
        else:
            with pytest.raises(ValueError, match="leaves the folder"):
                confined(name)


def test_text_problem_is_only_lone_surrogates() -> None:
    assert text_problem("a\x00b\uffff😀\U0010ffff") is None
    assert "U+D800" in text_problem("bad \ud800 half")


BASE = ["--context.eventid=e", "--context.correlationid=c"]
LITERAL_VALUES = ["a${oc.env:HOME}b", "${x}", "ev-${nokey}", "\\${x}", "\\\\${x}", "a\\b", "${", "$${a}", "${a.b}",
                  "${oc.env:HOME,${x}}", "'quoted'", '"double"', "a=b,c", "%(x)s", "{name}"]


@pytest.mark.parametrize("value", LITERAL_VALUES, ids=range(len(LITERAL_VALUES)))
def test_flag_values_are_taken_literally(value: str) -> None:
    cfg, _ = compose_config(["--context.eventid=ev", "--context.correlationid=" + value, "--sharedsecret=" + value,
                             "--mongodbdocprovider.password=" + value, "--logfile=" + value])
    assert cfg.context.correlationid == cfg.sharedsecret == cfg.mongodbdocprovider.password == cfg.logfile == value
    text = redacted_yaml(cfg)
    assert "sharedsecret: '***'" in text and "password: '***'" in text


def test_event_types_and_event_id_are_literal() -> None:
    cfg, _ = compose_config(BASE[1:] + ["--context.eventid=ev-${oc.env:HOME}", "--sharedsecret=s",
                                        "--valideventtypes=a${x},b",
                                        # one topic: "a${x}" cannot name a topic of its own (sidecar/dataplane/topics.py)
                                        "--servicebuseventprovider.topic=events"])
    assert cfg.context.eventid == "ev-${oc.env:HOME}" and cfg.valideventtypes == ["a${x}", "b"]


def test_environment_values_stay_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARED_SECRET", "env-${oc.env:HOME}")
    cfg, _ = compose_config(BASE)
    assert cfg.sharedsecret == "env-${oc.env:HOME}"


@pytest.mark.parametrize("argv, message", [
    (["--sharedsecret=s", "--serverport=${x}"], "--serverport=${x}"),
    (["--sharedsecret=s", "--loglevel=${x}"], "--loglevel=${x}"),
    (["--sharedsecret=s", "context.name=${nokey}"], "context.name"),
    (["--sharedsecret=s", "--context.name=a/b"], "--context.name=a/b"),
    (["--sharedsecret=s", "--context.name=.."], "--context.name=.."),
    (["--sharedsecret=s", "--context.name=x."], "--context.name=x."),
    (["--sharedsecret=s", "--context.name=caf\udce9"], "--context.name=caf\\xe9 is not valid UTF-8"),
    (["--sharedsecret=s", "--valideventtypes=\udcff"], "--valideventtypes"),
    (["--sharedsecret=s\udcff"], "--sharedsecret is not valid UTF-8"),
    (["--sharedsecret= padded "], "blank"), (["--sharedsecret=padded\t"], "blank"),
    (["--sharedsecret=a\nb"], "U+000A"), (["--sharedsecret=a\x7fb"], "U+007F"), (["--sharedsecret=a\x85b"], "U+0085"),
    (["--sharedsecret=\x00"], "U+0000"),
], ids=range(15))
def test_unusable_values_stop_start_up_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as err:
        compose_config(BASE + argv)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    for secret in ("padded", "a\nb", "a\x7fb"):
        assert secret not in text


def test_secret_rule_is_one_rule_for_server_and_client() -> None:
    for secret in ("pässwörd", "€uro", "漢字-😀", "s p a c e s", "ä\u00a0"):
        assert secret_problem(secret) is None
        assert matches(secret.encode("utf-8").decode("latin-1"), secret.encode("utf-8"))
        if not secret.isascii():  # its Latin-1 bytes (what the client used to send) no longer match
            assert not matches(secret.encode("latin-1", "replace").decode("latin-1"), secret.encode("utf-8"))
    for secret in (" x", "x ", "\tx", "a\rb", ""):
        assert secret_problem(secret)


def test_printconfig_with_interpolation_in_a_secret_prints_and_never_resolves(tmp_path: Path) -> None:
    env = python_env()
    env.pop("SHARED_SECRET", None)
    # A secret this short is refused once the configuration is printed: the process exits after printing.
    result = subprocess.run([sys.executable, "-m", "sidecar", *BASE, "--sharedsecret=${x}",
                             "--context.name=m-${oc.env:HOME}", f"--basedir={tmp_path / 'ion'}", "--printconfig"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "sharedsecret: '***'" in result.stdout and "name: m-${oc.env:HOME}" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 1, result.stderr
    assert "${x}" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", DONE_CASES, ids=[c.id for c in DONE_CASES])
def test_every_done_case_is_refused_before_any_commit(case, tmp_path: Path) -> None:
    """The whole corpus against the validation /done runs first (test_hostile.py drives a share of it
    through the app with both provider sets)."""
    layout = ModuleLayout(tmp_path / "ion")
    layout.prepare()
    reset_outputs(layout.basedir / "out")
    case.write(layout.basedir / "out")

    def key_of(path: str) -> str:
        return f"hostile-done/mod/{path}"

    try:
        with pytest.raises(InputError) as err:
            check_event_meta_sizes(plan_outputs(layout, ["file_discovered"], 256 * 1024, key_of=key_of), key_of)
    finally:  # a case's tree a thousand folders deep would break pytest's own clean-up (shutil.rmtree recurses)
        remove_tree(layout.basedir / "out")
    message = str(err.value)
    assert message.startswith(case.file) and case.detail in message, message
    message.encode("utf-8")  # sendable as JSON and to the Prefect API
    assert message.isprintable(), message  # every name in it shown escaped (sidecar.paths.shown)


@pytest.mark.parametrize("case", READY_CASES, ids=[c.id for c in READY_CASES])
def test_every_ready_case_is_refused_before_anything_is_staged(case, tmp_path: Path) -> None:
    meta = EventMeta(id="ev", eventId="ev", correlationId="c", parentEventId="p", eventType="t", producer="p",
                     files=[BlobFile(path=p, key=k, size=5) for p, k in case.files])
    (tmp_path / "in" / "data").mkdir(parents=True)
    with pytest.raises(DataPlaneError) as err:
        _check_paths(meta, tmp_path / "in" / "data")
    message = str(err.value)
    assert f"event meta 'ev' lists {case.what} '{case.shown}', which " in message and case.detail in message, message


FOLDS = {
    "case": str.casefold,
    "normalisation": lambda name: unicodedata.normalize("NFD", name),
    "both": lambda name: unicodedata.normalize("NFD", name.casefold()),
}


@pytest.mark.parametrize("fold, files, first", [
    ("case", ["Case.txt", "case.txt"], "Case.txt"),
    ("case", ["Reports/a.csv", "reports/b.csv", "REPORTS"], "REPORTS"),
    ("normalisation", ["caf\u00e9.txt", "cafe\u0301.txt"], "caf\u00e9.txt"),
    ("both", ["\u00c9t\u00e9/x", "e\u0301te\u0301/y", "\u00e9t\u00e9"], "\u00e9t\u00e9"),
], ids=["case", "case-folder-and-file", "nfc-nfd", "both"])
def test_inputs_one_folding_file_system_would_merge_are_refused_before_staging(
        fold: str, files: list[str], first: str, tmp_path: Path) -> None:
    """On a disk that does not tell case or normalisation forms apart (macOS, Windows: a developer's
    laptop in development mode), two inputs would be one file and /ready would answer 200 with one
    of them lost; the probe says how the disk compares names (tests/hostile cannot mount such a disk
    here, so the comparison is given) and the event meta is refused naming both."""
    meta = EventMeta(id="ev", eventId="ev", correlationId="c", parentEventId="p", eventType="t", producer="p",
                     files=[BlobFile(path=p, key=f"k/{p}", size=5) for p in files])
    (tmp_path / "in" / "data").mkdir(parents=True)
    _check_paths(meta, tmp_path / "in" / "data")  # a disk that tells them apart stages them all
    with pytest.raises(DataPlaneError) as err:
        _check_paths(meta, tmp_path / "in" / "data", FOLDS[fold])
    message = str(err.value)
    assert f"collides with '{shown(first)}'" in message and "does not tell case" in message, message


def test_the_probe_finds_this_disk_tells_names_apart_and_leaves_nothing(tmp_path: Path) -> None:
    """Linux file systems (the suite's, a container's volume) compare names byte for byte."""
    assert name_folding(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
