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
def test_secret_override_errors_never_show_the_value(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(BASE + ["--azureblobprovider=true", "--azureblobprovider.containername=abc", override])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "TOPSECRET" not in err and err.count("\n") == 1
    assert override.partition("=")[0] in err
