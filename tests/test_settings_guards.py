"""Start-up guards of the configuration path (sidecar/cli.py, the providers' Config.check): how a
provider is chosen, secrets in Hydra's errors, numeric ranges and connection strings."""

from __future__ import annotations

import pytest

from sidecar.cli import UsageError, compose_config, main
from sidecar.dataplane import registry

BASE = ["--context.eventid=e1", "--context.correlationid=c1", "--sharedsecret=secret-123456"]
AZURE = ["--azureblobprovider.containername=abc",
         "--azureblobprovider.connectionstring=AccountName=a;AccountKey=Zm9vYmFy;BlobEndpoint=http://127.0.0.1:1/a"]
MONGO = ["--mongodbdocprovider.uri=mongodb://127.0.0.1:1/"]
BUS = ["--servicebuseventprovider.connectionstring=Endpoint=sb://h/;SharedAccessKeyName=a;SharedAccessKey=bbbbbbbbbb",
       "--servicebuseventprovider.topic=t"]
SETTINGS = {"azureblobprovider": AZURE, "mongodbdocprovider": MONGO, "servicebuseventprovider": BUS}


def refused(argv: list[str]) -> str:
    with pytest.raises(UsageError) as caught:
        compose_config(BASE + argv)
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("flag", list(SETTINGS))
@pytest.mark.parametrize("spelling", ["--{flag}.enabled={v}", "{flag}.enabled={v}", "+{flag}.enabled={v}",
                                      "--{flag}.enabled", "{flag}.enabled ={v}"])
@pytest.mark.parametrize("value", ["false", "0", "no", "true"])
def test_enabled_is_not_a_setting(flag: str, spelling: str, value: str) -> None:
    """The provider is chosen by its switch only: ``.enabled`` would route a production sidecar's outputs
    to the development providers while /done answers 200."""
    arg = spelling.format(flag=flag, v=value)
    argv = [f"--{flag}=true", arg, *SETTINGS[flag]] if not arg.endswith("enabled") else \
        [f"--{flag}=true", *SETTINGS[flag], arg, "x"]
    message = refused(argv)
    assert f"{flag}.enabled" in message and ("unknown" in message)


@pytest.mark.parametrize("flag", list(SETTINGS))
@pytest.mark.parametrize("second", ["{flag}=dev", "~{flag}", "~{flag}={on}", "{flag}@_global_=dev", "--{flag}=false"])
def test_contradictory_or_deleted_choice_is_refused(flag: str, second: str) -> None:
    on = registry.groups()[flag][0]
    second = second.format(flag=flag, on=on)
    message = refused([f"--{flag}=true", second, *SETTINGS[flag]])
    assert flag in message and (second in message or "contradicts" in message)
    if "contradicts" in message:
        assert f"--{flag}=true" in message and second in message


@pytest.mark.parametrize("flag", list(SETTINGS))
@pytest.mark.parametrize("first", ["{flag} ={on}", "++{flag}={on}", " {flag}= {on}"])
def test_a_contradiction_names_the_first_choice_as_typed(flag: str, first: str) -> None:
    # The first choice is named as typed, whatever its spelling (it was searched for again, and a blank
    # before '=' made that search fail with a traceback instead of this line).
    first = first.format(flag=flag, on=registry.groups()[flag][0])
    message = refused([first, f"--{flag}=false", *SETTINGS[flag]])
    assert f"{first} contradicts --{flag}=false" in message, message


@pytest.mark.parametrize("flag", list(SETTINGS))
def test_same_choice_twice_is_accepted(flag: str) -> None:
    on = registry.groups()[flag][0]
    cfg, _ = compose_config(BASE + [f"--{flag}=true", f"{flag}={on}", *SETTINGS[flag]])
    assert [p.flag for p in registry.enabled(cfg)] == [flag]


@pytest.mark.parametrize("override", [
    "azureblobprovider.connectionstring=AccountName=a;AccountKey=TOPSECRETKEY==,BlobEndpoint=http://x",
    "azureblobprovider.connectionstring=TOPSECRETKEY,b",
    "azureblobprovider.blobaccountkey=TOPSECRETKEY]",
    "mongodbdocprovider.password=TOPSECRET]",
    "mongodbdocprovider.uri=mongodb://u:TOPSECRET@h/[",
    "servicebuseventprovider.key=TOPSECRET{",
    "servicebuseventprovider.connectionstring=Endpoint=sb://h/;SharedAccessKey=TOPSECRET",
    "sharedsecret=TOPSECRET)(",
])
def test_secret_override_errors_never_show_the_value(override: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.cli.serve", lambda cfg: pytest.fail("start-up accepted the override"))
    with pytest.raises(SystemExit) as caught:
        main(BASE + ["--azureblobprovider=true", "--azureblobprovider.containername=abc", override])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "TOPSECRET" not in err and err.count("\n") == 1
    assert override.partition("=")[0] in err


# --- numeric ranges (sidecar.bounds) -----------------------------------------------------------------

def _numeric_settings() -> list[tuple[str, str, type, object]]:
    """(prefix, field, settings class, Bounds or None) for every int/float setting of the schema."""
    import dataclasses
    import typing

    from sidecar.config import SidecarConfig

    found = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif hint in (int, float):
                found.append((prefix, f.name, cls, getattr(cls, "BOUNDS", {}).get(f.name)))

    walk(SidecarConfig, "")
    return found


NUMERIC = _numeric_settings()


def _provider_args(prefix: str) -> list[str]:
    flag = prefix.rstrip(".")
    return [f"--{flag}=true", *SETTINGS[flag]] if flag in SETTINGS else []


def test_every_numeric_setting_has_a_range() -> None:
    missing = [p + n for p, n, _, b in NUMERIC if b is None]
    assert not missing, f"numeric settings without BOUNDS: {missing}"
    assert len(NUMERIC) >= 17


def _bad_values(bounds, is_float: bool) -> list[str]:
    bad = []
    if bounds.low is not None:
        bad += [str(bounds.low if bounds.above else bounds.low - 1), "-1" if bounds.low >= 0 else str(bounds.low - 5)]
    if bounds.high is not None:
        bad.append(str(int(bounds.high) + 1))
    if is_float:
        bad += ["nan", "inf", "-inf"]
    return list(dict.fromkeys(bad))


@pytest.mark.parametrize("prefix,name,cls,bounds", NUMERIC, ids=[p + n for p, n, _, _ in NUMERIC])
def test_out_of_range_is_refused_naming_flag_and_range(prefix, name, cls, bounds) -> None:
    import typing

    is_float = typing.get_type_hints(cls)[name] is float
    for value in _bad_values(bounds, is_float):
        message = refused([*_provider_args(prefix), f"--{prefix}{name}={value}"])
        assert message.startswith(f"--{prefix}{name}=") and bounds.describe() in message, message
    # The ends of the range are valid.
    for edge in (bounds.low, bounds.high):
        if edge is not None and not (edge == bounds.low and bounds.above):
            argv = [*_provider_args(prefix), f"--{prefix}{name}={int(edge) if not is_float else edge}"]
            if name == "chunkbytes":
                argv.append(f"--{prefix}inflightbytes={int(edge)}")
            if name == "inflightbytes":
                argv.append(f"--{prefix}chunkbytes={int(edge)}")
            compose_config(BASE + argv)


@pytest.mark.parametrize("argv", [
    ["--azureblobprovider.chunkbytes=0"], ["--azureblobprovider.chunkbytes=-5"],
    ["--azureblobprovider.chunkbytes=100000000000000000000"], ["--azureblobprovider.inflightbytes=-1"],
    ["--azureblobprovider.chunkbytes=8388608", "--azureblobprovider.inflightbytes=4194304"],
    ["--mongodbdocprovider=true", *MONGO, "--mongodbdocprovider.port=99999"],
    ["--mongodbdocprovider=true", *MONGO, "mongodbdocprovider.serverselectiontimeoutseconds=-1"],
    ["transfer.tasks=0"], ["--transfer.concurrency=-3"], ["--maxeventbytes=-1"], ["--serverport=0"],
])
def test_hostile_numbers_are_refused(argv: list[str]) -> None:
    if any(a.startswith("--azureblobprovider.") for a in argv):
        argv = ["--azureblobprovider=true", *AZURE, *argv]
    assert "out of range" in refused(argv)


# --- connection strings, parsed by the SDKs at start-up ----------------------------------------------

AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.mark.parametrize("flag,argv", [
    ("servicebuseventprovider.connectionstring",
     ["--servicebuseventprovider.connectionstring=Endpoint=nonsense;SharedAccessKey=TOPSECRET-KEY-123"]),
    ("servicebuseventprovider.connectionstring",
     ["--servicebuseventprovider.connectionstring=Endpoint=sb://h/;SharedAccessKey=TOPSECRET-KEY-123"]),
    ("servicebuseventprovider.connectionstring", ["--servicebuseventprovider.connectionstring=TOPSECRET-KEY-123"]),
    ("azureblobprovider.connectionstring",
     [f"--azureblobprovider.connectionstring=DefaultEndpointsProtocol=http; AccountName=devstoreaccount1 ; "
      f"AccountKey=TOPSECRET{AZURE_KEY} ; BlobEndpoint=http://127.0.0.1:1/devstoreaccount1"]),
    ("azureblobprovider.connectionstring", ["--azureblobprovider.connectionstring=Foo=TOPSECRET;Bar=baz"]),
    ("azureblobprovider.connectionstring", ["--azureblobprovider.connectionstring=TOPSECRET"]),
])
def test_connection_strings_the_sdk_refuses_stop_start_up(flag: str, argv: list[str]) -> None:
    """What the SDK would refuse when the provider is built (a traceback, exit 1) or on the first publish
    (after blobs and event metas were committed: a partial /done) is refused at start-up."""
    group = flag.split(".")[0]
    others = [a for a in SETTINGS[group] if "connectionstring" not in a]
    err = refused([f"--{group}=true", "--azureblobprovider.containername=abc", *others, *argv])
    assert f"--{flag}" in err and "TOPSECRET" not in err


@pytest.mark.parametrize("cs", [
    f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURE_KEY};"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
    f"defaultendpointsprotocol=http;accountname=devstoreaccount1;accountkey={AZURE_KEY};"
    "blobendpoint=http://127.0.0.1:10000/devstoreaccount1",
    "UseDevelopmentStorage=true",
    "BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=sv=2020-08-04&sig=abc",
])
def test_odd_but_valid_azure_connection_strings_are_accepted(cs: str) -> None:
    cfg, _ = compose_config(BASE + ["--azureblobprovider=true", "--azureblobprovider.containername=abc",
                                    f"--azureblobprovider.connectionstring={cs}"])
    registry.check(cfg)


@pytest.mark.parametrize("flag,argv", [
    ("uri", ["--mongodbdocprovider.uri=http://not-mongo"]),
    ("uri", ["--mongodbdocprovider.uri=mongodb://u:p%ZZ@h:notaport/"]),
    ("uri", ["--mongodbdocprovider.uri=mongodb://u:TOPSECRET@h:99999/"]),
    ("host", ["--mongodbdocprovider.name=acct", "--mongodbdocprovider.password=TOPSECRET-pw",
              "--mongodbdocprovider.host=a:b:c"]),
    ("collection", [*MONGO, "--mongodbdocprovider.collection=$bad.name"]),
    ("collection", [*MONGO, "--mongodbdocprovider.collection=.a"]),
])
def test_mongo_uri_and_collection_pymongo_refuses_stop_start_up(flag: str, argv: list[str]) -> None:
    err = refused(["--mongodbdocprovider=true", *argv])
    assert f"--mongodbdocprovider.{flag}" in err and "TOPSECRET" not in err


# Event types and topics that Service Bus cannot name (sidecar/dataplane/topics.py): refused at start-up in
# development mode and with the real bus alike, since both route each event to the topic of its type.
UNNAMEABLE = {"space and hash": "file discovered#1", "at": "a@b", "star": "a*", "question mark": "a?b",
              "percent": "a%20b", "non-ascii": "caf\u00e9", "leading slash": "/a", "trailing slash": "a/",
              "leading dot": ".a", "trailing dot": "a.", "empty segment": "a//b", "261 characters": "a" * 261,
              "control character": "a\x1bb"}


@pytest.mark.parametrize("bus", [["--development=true"], ["--servicebuseventprovider=true", BUS[0]]], ids=["dev", "bus"])
@pytest.mark.parametrize("topic", ["", "{eventType}"])
@pytest.mark.parametrize("event_type", list(UNNAMEABLE.values()), ids=list(UNNAMEABLE))
def test_event_types_that_cannot_name_a_topic_stop_start_up(bus: list[str], topic: str, event_type: str) -> None:
    message = refused([*bus, f"--servicebuseventprovider.topic={topic}", f"--valideventtypes=ok,{event_type}"])
    assert message.startswith("--valideventtypes: event type '") and "Service Bus topic name" in message, message
    assert "\x1b" not in message


@pytest.mark.parametrize("bus", [["--development=true"], ["--servicebuseventprovider=true", BUS[0]]], ids=["dev", "bus"])
def test_event_types_differing_only_in_case_stop_start_up(bus: list[str]) -> None:
    message = refused([*bus, "--valideventtypes=Found,other,found"])
    assert "'Found' and 'found' differ only in case" in message and "--valideventtypes" in message


@pytest.mark.parametrize("event_type", list(UNNAMEABLE.values())[:4], ids=list(UNNAMEABLE)[:4])
def test_a_fixed_topic_takes_any_event_type_but_must_itself_be_a_name(event_type: str) -> None:
    cfg, _ = compose_config(BASE + ["--development=true", "--servicebuseventprovider.topic=ion-events",
                                    f"--valideventtypes={event_type},Found,found"])
    assert cfg.valideventtypes == [event_type, "Found", "found"]
    message = refused(["--development=true", f"--servicebuseventprovider.topic={event_type}"])
    assert message.startswith(f"--servicebuseventprovider.topic={event_type} ") and "Service Bus topic name" in message


def test_names_within_the_rules_start() -> None:
    types = ["file_discovered", "a.b-c/d_e", "A" * 260, "0"]
    cfg, _ = compose_config(BASE + ["--development=true", f"--valideventtypes={','.join(types)}"])
    assert cfg.valideventtypes == types


def test_an_unnameable_event_type_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(BASE + ["--development=true", "--valideventtypes=file discovered#1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sidecar: error: --valideventtypes: event type 'file discovered#1' holds ' ', '#'"), err
