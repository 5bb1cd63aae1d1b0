"""Flag translation and configuration composition (sidecar/cli.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.cli import UsageError, compose_config, parse_args, redacted_yaml
from sidecar.config import LogLevel
from testsupport.processes import python_env

# The seed's Linux command line (spec/SIDECAR.md, "Linux Bash"), placeholders filled in.
SEED = """
--context.correlationid=corr-42
--context.eventid=evt-42
--context.parenteventid=evt-41
--context.name=facedetect
--loglevel=info
--logfile=/tmp/sidecar.log
--serverport=8080
--sharedsecret=s3cret==
--valideventtypes=face_detected,no_face
--azureblobprovider=true
--azureblobprovider.blobaccountkey=a2V5PT0+/Kw==
--azureblobprovider.blobaccountname=ionaccount
--azureblobprovider.containername=ioncontainer
--mongodbdocprovider=true
--mongodbdocprovider.collection=ioncollection
--mongodbdocprovider.name=iondb
--mongodbdocprovider.password=p@ss:w/rd=
--mongodbdocprovider.port=10255
--servicebuseventprovider=true
--servicebuseventprovider.authorizationrulename=RootManageSharedAccessKey
--servicebuseventprovider.key=c2Iga2V5=
--servicebuseventprovider.namespace=ionbus
--servicebuseventprovider.topic=ion
""".split()


def test_seed_command_line_composes_verbatim() -> None:
    cfg, parsed = compose_config(SEED)
    assert parsed.printconfig is False
    assert (cfg.context.correlationid, cfg.context.eventid, cfg.context.parenteventid, cfg.context.name) == \
        ("corr-42", "evt-42", "evt-41", "facedetect")
    assert cfg.loglevel is LogLevel.info and cfg.logfile == "/tmp/sidecar.log" and cfg.serverport == 8080
    assert cfg.sharedsecret == "s3cret=="
    assert cfg.valideventtypes == ["face_detected", "no_face"]
    blob = cfg.azureblobprovider
    assert blob.enabled and (blob.blobaccountkey, blob.blobaccountname, blob.containername) == \
        ("a2V5PT0+/Kw==", "ionaccount", "ioncontainer")
    mongo = cfg.mongodbdocprovider
    assert mongo.enabled and (mongo.collection, mongo.name, mongo.password, mongo.port) == \
        ("ioncollection", "iondb", "p@ss:w/rd=", 10255)
    bus = cfg.servicebuseventprovider
    assert bus.enabled and (bus.authorizationrulename, bus.key, bus.namespace, bus.topic) == \
        ("RootManageSharedAccessKey", "c2Iga2V5=", "ionbus", "ion")
    assert cfg.development is False and cfg.host == "127.0.0.1" and cfg.basedir == "/ion"


def test_plain_hydra_overrides_and_flags_mix() -> None:
    cfg, _ = compose_config([
        "context.eventid=e1", "context.correlationid=c1", "sharedsecret=x", "transfer.tasks=2",
        "azureblobprovider=azure", "azureblobprovider.containername=box",
        "azureblobprovider.connectionstring='UseDevelopmentStorage=true'", "--basedir=/data", "--host", "0.0.0.0",
        "--development=false",
    ])
    assert cfg.transfer.tasks == 2 and cfg.azureblobprovider.enabled and cfg.azureblobprovider.containername == "box"
    assert cfg.basedir == "/data" and cfg.host == "0.0.0.0"


def test_provider_off_keeps_development_provider() -> None:
    cfg, _ = compose_config(["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s",
                             "--azureblobprovider=false", "--development"])
    assert not cfg.azureblobprovider.enabled and cfg.development


def test_shared_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARED_SECRET", "from-env")
    cfg, _ = compose_config(["--context.eventid=e", "--context.correlationid=c"])
    assert cfg.sharedsecret == "from-env"
    cfg, _ = compose_config(["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=flag"])
    assert cfg.sharedsecret == "flag"


def test_execution_id_is_deterministic() -> None:
    a, _ = compose_config(["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--context.name=m"])
    b, _ = compose_config(["--context.eventid=e", "--context.correlationid=c2", "--sharedsecret=s", "--context.name=m"])
    assert a.context.execution_id() == b.context.execution_id()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--context.correlationid=c", "--sharedsecret=s"], "context.eventid"),
        (["--context.eventid=e", "--sharedsecret=s"], "context.correlationid"),
        (["--context.eventid=e", "--context.correlationid=c"], "sharedsecret"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--nosuchflag=1"], "--nosuchflag"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--azureblobprovider.nope=1"],
         "--azureblobprovider.nope"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--serverport=http"], "--serverport"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--loglevel=loud"], "--loglevel"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--azureblobprovider=maybe"],
         "--azureblobprovider"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--development=true",
          "--mongodbdocprovider=true", "--mongodbdocprovider.uri=mongodb://x"], "--development"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "--azureblobprovider=true"],
         "containername"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "nosuch=1"], "nosuch"),
        (["--context.eventid"], "--context.eventid"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "basedir=a=b"], "basedir=a=b"),
        (["--context.eventid=e", "--context.correlationid=c", "--sharedsecret=s", "mongodbdocprovider=xyz"],
         "available: dev, mongo"),
    ],
)
def test_bad_command_lines_name_the_setting(monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str) -> None:
    monkeypatch.delenv("SHARED_SECRET", raising=False)
    with pytest.raises(UsageError) as err:
        compose_config(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_switches_without_value() -> None:
    parsed = parse_args(["--printconfig", "--development", "--mongodbdocprovider"])
    assert parsed.printconfig and ("development", "true") in parsed.values
    assert "mongodbdocprovider=mongo" in parsed.overrides


def test_printconfig_redacts_every_secret() -> None:
    cfg, _ = compose_config(SEED + ["--azureblobprovider.connectionstring=AccountName=a;AccountKey=zzz-conn;BlobEndpoint=http://h/a",
                                    "--mongodbdocprovider.uri=mongodb://u:pw-in-uri@h/"])
    text = redacted_yaml(cfg)
    for secret in ("s3cret==", "a2V5PT0+/Kw==", "p@ss:w/rd=", "c2Iga2V5=", "zzz-conn", "pw-in-uri"):
        assert secret not in text
    assert "ionaccount" in text and "'***'" in text


def test_process_exits_2_with_one_line(tmp_path) -> None:
    env = python_env()
    env.pop("SHARED_SECRET", None)
    result = subprocess.run([sys.executable, "-m", "sidecar", "--context.eventid=e", "--bogus=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bogus" in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()
