"""A new user's first contact: the command line forms the help text promises, one-line errors that
name everything at once, development mode's folders, and log masking that never garbles words."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import DEVELOPMENT_BASEDIR, UsageError, check_startup, compose_config, parse_args
from sidecar.logs import MIN_SECRET_CHARS, ContextFilter
from testsupport.processes import python_env

BASE = ["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=long-enough-secret"]


def run_sidecar(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The ``sidecar`` command as a user runs it (``python -m sidecar``), expected to stop at start-up."""
    environment = python_env(**env)
    if "SHARED_SECRET" not in env:
        environment.pop("SHARED_SECRET", None)
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, printconfig", [
    (["--printconfig", "true"], True),
    (["--printconfig", "false"], False),
    (["--printconfig", "TRUE"], True),
    (["--printconfig"], True),
    (["--printconfig=true"], True),
    (["printconfig=true"], True),
    (["printconfig=false"], False),
    (["+printconfig=true"], True),
])
def test_printconfig_in_every_documented_form(argv: list[str], printconfig: bool) -> None:
    cfg, parsed = compose_config(BASE + argv + ["--development", "true"])
    assert parsed.printconfig is printconfig
    assert cfg.development is True
    assert not any("printconfig" in o or o in ("true", "false") for o in parsed.overrides), parsed.overrides


def test_switch_followed_by_a_hydra_override_keeps_the_override() -> None:
    parsed = parse_args(["--development", "transfer.tasks=2", "--printconfig", "--loglevel=debug"])
    assert ("development", "true") in parsed.values and parsed.printconfig
    assert parsed.overrides == ["transfer.tasks=2"]


def test_printconfig_override_with_a_bad_value_is_one_line() -> None:
    with pytest.raises(UsageError, match="--printconfig takes true or false, not 'maybe'"):
        parse_args(["printconfig=maybe"])


def test_every_missing_required_setting_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARED_SECRET", raising=False)
    with pytest.raises(UsageError) as err:
        compose_config(["--azureblobprovider=true", "--azureblobprovider.connectionstring=UseDevelopmentStorage=true",
                        "--mongodbdocprovider=true", "--mongodbdocprovider.collection="])
    message = str(err.value)
    assert "\n" not in message
    assert message == ("missing required settings: --context.eventid, --context.correlationid, "
                       "--sharedsecret (or SHARED_SECRET), --azureblobprovider.containername, "
                       "--mongodbdocprovider.collection")


def test_process_names_all_missing_settings_in_one_line(tmp_path: Path) -> None:
    result = run_sidecar(tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for flag in ("--context.eventid", "--context.correlationid", "--sharedsecret"):
        assert flag in lines[0]


def test_development_mode_keeps_the_module_folder_in_the_working_directory() -> None:
    dev, _ = compose_config(BASE + ["--development=true"])
    assert dev.basedir == DEVELOPMENT_BASEDIR and not Path(dev.basedir).is_absolute()
    production, _ = compose_config(BASE)
    assert production.basedir == "/ion"
    explicit, _ = compose_config(BASE + ["--development=true", "--basedir=/ion"])
    assert explicit.basedir == "/ion"
    override, _ = compose_config(BASE + ["development=true", "basedir=/data"])
    assert override.basedir == "/data"


def test_unusable_basedir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_sidecar(tmp_path, *BASE, "--development=true", "--basedir=/proc/ion-sidecar/ion")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: error: --basedir=/proc/ion-sidecar/ion cannot be used"), \
        result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_another_process_holds_is_one_line_naming_the_flag_and_exit_2(tmp_path: Path) -> None:
    """scripts/dev (or any sidecar) on a port that is taken: before it starts anything (the development
    Prefect server takes seconds), one line naming --serverport and how to pick another port."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run_sidecar(tmp_path, *BASE, "--development=true", f"--serverport={port}",
                             f"--basedir={tmp_path / 'ion'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"sidecar: error: --serverport={port}: another process is already listening on "
                     f"127.0.0.1:{port}; stop it, or pick another port with --serverport (e.g. --serverport={port + 1})"], \
        result.stderr
    assert not (tmp_path / ".dev").exists()  # nothing was started


def test_basedir_below_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    cfg, _ = compose_config(BASE + ["--development=true", f"--basedir={tmp_path / 'afile' / 'ion'}"])
    with pytest.raises(UsageError, match=r"--basedir=.*afile/ion cannot be used: Not a directory"):
        check_startup(cfg)
    usable, _ = compose_config(BASE + ["--development=true", f"--basedir={tmp_path / 'new' / 'ion'}"])
    check_startup(usable)
    assert (tmp_path / "new" / "ion").is_dir()


def test_secret_too_short_to_mask_is_refused_without_showing_it(tmp_path: Path) -> None:
    result = run_sidecar(tmp_path, "--context.eventid=e", "--context.correlationid=c", SHARED_SECRET="Qz7")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"sidecar: error: --sharedsecret (SHARED_SECRET) is shorter than {MIN_SECRET_CHARS} characters: logs could not "
        "mask it without masking ordinary words; use a longer secret"), result.stderr
    assert "Qz7" not in result.stderr + result.stdout


@pytest.mark.parametrize("flags, named", [
    (["--sharedsecret=Qz7"], "--sharedsecret "),
    (["--mongodbdocprovider=true", "--mongodbdocprovider.uri=mongodb://h/", "--mongodbdocprovider.password=Qz7"],
     "--mongodbdocprovider.password "),
    (["--servicebuseventprovider=true", "--servicebuseventprovider.connectionstring=Endpoint=sb://h;SharedAccessKeyName=r;SharedAccessKey=k-long-enough",
      "--servicebuseventprovider.key=1234567"], "--servicebuseventprovider.key "),
])
def test_every_secret_setting_has_the_length_rule(tmp_path: Path, flags: list[str], named: str) -> None:
    argv = [f for f in BASE if not f.startswith("--sharedsecret")] + ["--sharedsecret=long-enough-secret"]
    cfg, _ = compose_config(argv + flags + [f"--basedir={tmp_path}"])
    with pytest.raises(UsageError) as err:
        check_startup(cfg)
    assert str(err.value).startswith(named) and "Qz7" not in str(err.value) and "1234567" not in str(err.value)
    # Eight characters are enough.
    cfg, _ = compose_config(argv + [f.replace("Qz7", "Qz7-long").replace("1234567", "12345678") for f in flags]
                            + [f"--basedir={tmp_path}"])
    check_startup(cfg)


def masked(secrets: list[str], message: str, *args: object, exc: BaseException | None = None) -> str:
    """What :class:`ContextFilter` lets through for one record: its message and formatted exception."""
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    ContextFilter({}, secrets).filter(record)
    return record.getMessage() + "\n" + (record.exc_text or "")


def test_masking_never_garbles_ordinary_words() -> None:
    secret = "Secret-9f2c1e"
    try:
        raise RuntimeError("an exception while connecting")
    except RuntimeError as error:
        text = masked([secret], "the exception text: %s", "expected", exc=error)
    assert "the exception text: expected" in text and "RuntimeError: an exception while connecting" in text
    assert "***" not in text
    # A short secret (only a caller bypassing the start-up check can pass one) is masked as a word only.
    assert masked(["x"], "exception x=1 (x) max") == "exception ***=1 (***) max\n"


@pytest.mark.parametrize("line", [
    "key={s}", "{s}", "prefix{s}suffix", "AccountKey={s};", "'{s}'", "{s}{s}", "a {s}\nb {s}",
])
def test_masking_never_leaks_a_secret(line: str) -> None:
    secret, other = "pa55-Word-7c1d", "AccountKeyValue=="
    for s in (secret, other):
        text = masked([secret, other], line.format(s=s))
        assert s not in text and "***" in text
        try:
            raise ValueError(line.format(s=s))
        except ValueError as error:
            assert s not in masked([secret, other], "failed", exc=error)


def test_printconfig_override_prints_from_the_command(tmp_path: Path) -> None:
    # The unusable --basedir stops the process right after printing, so nothing is served.
    result = run_sidecar(tmp_path, *BASE, "printconfig=true", "--development", "true", "--basedir=/proc/ion-sidecar/ion")
    assert result.returncode == 2, result.stderr
    assert "eventid: e" in result.stdout and "sharedsecret: '***'" in result.stdout, result.stdout
    assert "long-enough-secret" not in result.stdout + result.stderr
