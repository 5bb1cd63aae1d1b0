"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose 1.29, installed by ``scripts/setup test``) parses,
interpolates and validates the file as ``docker compose up`` would; the tests read its normalised
output. The sidecar's flags are then composed by the sidecar's own parser, and the image's health
check command is run against a real sidecar process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.cli import compose_config
from testsupport.processes import ROOT, SidecarProcess, free_port

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
EMULATOR_CONFIG = "/ServiceBus_Emulator/ConfigFiles/Config.json"


def docker_compose(*args: str) -> subprocess.CompletedProcess:
    """Run docker-compose in a bare environment (no stray SHARED_SECRET etc. from the caller)."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: scripts/setup test installs Debian's docker-compose package"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The compose file as ``docker-compose config`` normalises it, with .env.example's values and
    the licences accepted (ACCEPT_EULA=Y, as a user sets it)."""
    env_file = env_file_with(tmp_path_factory.mktemp("compose"), ACCEPT_EULA="Y")
    result = docker_compose("--env-file", str(env_file), "-f", str(COMPOSE), "config")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, flags=re.MULTILINE)]


def exec_form(arguments: str) -> list[str]:
    """A JSON exec-form argument list (``["a", "b"]``)."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    return value


def flags(service: dict) -> dict[str, str]:
    """``{"--key": "value"}`` of a service's command (the sidecar's flags)."""
    return dict(arg.split("=", 1) for arg in service["command"])


SERVICES = {"sidecar", "module", "azurite", "blob-container", "mongo", "servicebus", "servicebus-ready", "sqlserver",
            "postgres", "prefect"}
# One-shot containers: waited for with service_completed_successfully, no health check of their own.
ONE_SHOT = {"module", "blob-container", "servicebus-ready"}
# Long-running services whose health is not a compose health check: the sidecar's is the image's
# HEALTHCHECK; the emulator's image documents no tool to probe with, so `servicebus-ready` probes its
# documented GET :5300/health from outside and the sidecar waits for that.
HEALTH_ELSEWHERE = {"sidecar": "the image's HEALTHCHECK", "servicebus": "servicebus-ready"}
# The only start-order edges that do not wait for health or completion, each for a stated reason.
STARTED_ONLY = {
    ("module", "sidecar"),            # Ion starts both at once; the module's /ready retry loop covers it
    ("servicebus-ready", "servicebus"),  # the probe itself waits for the emulator's health endpoint
}
# How a pinned tag of each image looks: a full release version, never a moving tag.
RELEASE_TAG = {
    "python": r"\d+\.\d+\.\d+-slim-\w+",
    "mcr.microsoft.com/azure-storage/azurite": r"\d+\.\d+\.\d+",
    "mongo": r"\d+\.\d+\.\d+",
    "mcr.microsoft.com/azure-messaging/servicebus-emulator": r"\d+\.\d+\.\d+",
    "mcr.microsoft.com/mssql/server": r"2022-CU\d+-ubuntu-\d+\.\d+",
    "postgres": r"\d+\.\d+-alpine",  # PostgreSQL releases are major.minor
    "prefecthq/prefect": r"\d+\.\d+\.\d+-python3\.11",
}


def image_references(compose: dict) -> dict[str, str]:
    """``{where: image}`` for every image a deployment pulls: compose services and the Dockerfile's FROM."""
    refs = {f"service {name}": svc["image"] for name, svc in compose["services"].items()}
    refs.update({f"Dockerfile FROM": v.split()[0] for k, v in dockerfile_instructions() if k == "FROM"})
    return refs


def test_compose_declares_every_service(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["prefect"]["command"] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    # One image, built once: only the sidecar builds it, the one-shot containers reuse it as built.
    builders = [name for name, svc in services.items() if "build" in svc]
    assert builders == ["sidecar"] and services["sidecar"]["build"]["context"] == str(ROOT)
    assert services["sidecar"]["pull_policy"] == "build"  # never looked up in a registry
    for name in ONE_SHOT:
        assert services[name]["image"] == services["sidecar"]["image"] == "ion-sidecar:local"
        assert services[name]["pull_policy"] == "never", f"{name} must not pull the locally built image"


def test_every_image_reference_is_pinned(compose: dict) -> None:
    refs = image_references(compose)
    pulled = {where: image for where, image in refs.items() if not image.startswith("ion-sidecar:")}
    assert len(pulled) == 7, refs
    for where, image in pulled.items():
        repository, _, tag = image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
        assert repository in RELEASE_TAG, f"{where}: {image} is not an image this stack expects"
        assert "@sha256:" in image or re.fullmatch(RELEASE_TAG[repository], tag), \
            f"{where}: {image} is not pinned to a release (want {RELEASE_TAG[repository]})"
        assert "latest" not in tag


def test_pin_check_refuses_moving_tags() -> None:
    # The rule above, applied to the tags it must refuse (not vacuous).
    for repository, tag in [("mongo", "7"), ("mongo", "latest"), ("prefecthq/prefect", "3-latest"),
                            ("python", "3.11-slim"), ("mcr.microsoft.com/mssql/server", "2022-latest"),
                            ("mcr.microsoft.com/azure-messaging/servicebus-emulator", "latest"), ("postgres", "17-alpine")]:
        assert not re.fullmatch(RELEASE_TAG[repository], tag), (repository, tag)


def test_prefect_server_runs_the_locked_prefect_on_postgresql(compose: dict) -> None:
    services = compose["services"]
    prefect, postgres = services["prefect"], services["postgres"]
    locked = re.search(r"^prefect==(\S+)", (ROOT / "requirements.lock").read_text(), flags=re.MULTILINE).group(1)
    assert prefect["image"] == f"prefecthq/prefect:{locked}-python3.11"
    url = prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    env = postgres["environment"]
    assert url == f"postgresql+asyncpg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    assert any(v.endswith(":/var/lib/postgresql/data:rw") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert prefect["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_published_ports_are_loopback_only(compose: dict) -> None:
    published = {name: svc.get("ports", []) for name, svc in compose["services"].items()}
    assert "127.0.0.1:4200:4200/tcp" in published["prefect"]  # the Prefect UI
    assert "127.0.0.1:8080:8080/tcp" in published["sidecar"]
    assert "127.0.0.1:5672:5672/tcp" in published["servicebus"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback address"


def test_missing_env_file_stops_compose_naming_the_variable() -> None:
    # Secrets have no defaults in the file: without .env, compose refuses and says what to set.
    result = docker_compose("-f", str(COMPOSE), "config")
    assert result.returncode != 0
    assert re.search(r"set (SHARED_SECRET|MONGO_ROOT_PASSWORD|AZURITE_ACCOUNT_KEY|MSSQL_SA_PASSWORD|ACCEPT_EULA)", result.stderr)


def test_sidecar_flags_enable_all_three_real_providers(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = compose["services"]["sidecar"]
    given = flags(sidecar)
    assert given["--azureblobprovider"] == given["--mongodbdocprovider"] == given["--servicebuseventprovider"] == "true"
    assert "BlobEndpoint=http://azurite:10000/" in given["--azureblobprovider.connectionstring"]
    uri = given["--mongodbdocprovider.uri"]
    assert re.fullmatch(r"mongodb://root:[^@]+@mongo:27017/\?authSource=admin", uri), uri
    bus = given["--servicebuseventprovider.connectionstring"]
    assert "Endpoint=sb://servicebus;" in bus and "UseDevelopmentEmulator=true" in bus
    assert sidecar["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"

    # The image's ENTRYPOINT plus compose's command, through the sidecar's own parser and checks.
    entrypoint = exec_form(dict(dockerfile_instructions())["ENTRYPOINT"])
    monkeypatch.setenv("SHARED_SECRET", sidecar["environment"]["SHARED_SECRET"])
    cfg, _ = compose_config(entrypoint[1:] + sidecar["command"])
    assert cfg.host == "0.0.0.0" and cfg.serverport == 8080 and cfg.basedir == "/ion"
    assert cfg.azureblobprovider.enabled and cfg.mongodbdocprovider.enabled and cfg.servicebuseventprovider.enabled
    assert not cfg.development and cfg.valideventtypes == ["file_discovered"]


def test_secrets_of_the_services_match_the_sidecar_flags(compose: dict) -> None:
    services = compose["services"]
    given = flags(services["sidecar"])
    mongo_env = services["mongo"]["environment"]
    assert mongo_env["MONGO_INITDB_ROOT_USERNAME"] == "root"
    assert f"root:{mongo_env['MONGO_INITDB_ROOT_PASSWORD']}@" in given["--mongodbdocprovider.uri"]

    account, key = services["azurite"]["environment"]["AZURITE_ACCOUNTS"].split(":", 1)
    blob = given["--azureblobprovider.connectionstring"]
    assert f"AccountName={account};AccountKey={key};" in blob
    assert services["blob-container"]["environment"]["BLOB_CONNECTION_STRING"] == blob
    assert services["blob-container"]["environment"]["BLOB_CONTAINER"] == given["--azureblobprovider.containername"]

    bus, sql = services["servicebus"]["environment"], services["sqlserver"]["environment"]
    assert bus["SQL_SERVER"] == "sqlserver" and bus["MSSQL_SA_PASSWORD"] == sql["MSSQL_SA_PASSWORD"]
    assert bus["ACCEPT_EULA"] == sql["ACCEPT_EULA"] == "Y"
    assert services["module"]["environment"]["SHARED_SECRET"] == services["sidecar"]["environment"]["SHARED_SECRET"]


def test_placeholders_only_in_the_env_example() -> None:
    values = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                  if line and not line.startswith("#"))
    for name in ("SHARED_SECRET", "MONGO_ROOT_PASSWORD", "MSSQL_SA_PASSWORD", "POSTGRES_PASSWORD"):
        assert "change-me" in values[name].lower(), f"{name} must be an obvious placeholder"
    assert values["ACCEPT_EULA"] == "N"  # the user accepts the EULAs, not this repository
    assert ".env" in (ROOT / ".gitignore").read_text().split() and ".env" in (ROOT / ".dockerignore").read_text().split()


def test_module_shares_the_volume_and_reaches_the_sidecar(compose: dict) -> None:
    services = compose["services"]
    sidecar, module = services["sidecar"], services["module"]
    given = flags(sidecar)
    assert "ion:/ion:rw" in sidecar["volumes"] and "ion:/ion:rw" in module["volumes"]
    assert module["environment"]["SIDECAR_HOST"] == "sidecar"
    assert module["environment"]["SIDECAR_PORT"] == given["--serverport"] == sidecar["environment"]["SIDECAR_PORT"]
    assert module["environment"]["SIDECAR_BASEDIR"] == given["--basedir"]
    script = module["entrypoint"][-1]
    assert module["entrypoint"][0] == "python" and script == "/opt/sidecar/examples/module.py"
    assert (ROOT / "examples" / "module.py").is_file()
    # Started at once with the sidecar: the module's /ready retry loop covers the start-up.
    assert module["depends_on"]["sidecar"]["condition"] == "service_started"


def test_health_checks_and_start_order(compose: dict) -> None:
    services = compose["services"]
    for name, svc in services.items():
        check = svc.get("healthcheck", {}).get("test", [])
        if name in ONE_SHOT:
            assert check == ["NONE"] and svc["restart"] in ("no", "on-failure"), name
        elif name in HEALTH_ELSEWHERE:
            assert check in ([], ["NONE"]), name
        else:
            assert check and check != ["NONE"], f"{name} has no health check"
        for target, edge in svc.get("depends_on", {}).items():
            wanted = ("service_completed_successfully" if target in ONE_SHOT
                      else "service_started" if (name, target) in STARTED_ONLY else "service_healthy")
            assert edge["condition"] == wanted, f"{name} -> {target}: {edge['condition']}, want {wanted}"
    # Every service but the entry points is waited for by something; the sidecar waits for each
    # data-plane service and for the Prefect API.
    assert set(services["sidecar"]["depends_on"]) == {"prefect", "mongo", "blob-container", "servicebus-ready"}
    assert services["servicebus"]["depends_on"]["sqlserver"]["condition"] == "service_healthy"
    assert services["blob-container"]["depends_on"]["azurite"]["condition"] == "service_healthy"
    probe = services["servicebus-ready"]["command"][-1]
    assert "http://servicebus:5300/health" in probe and services["servicebus"]["environment"]["EMULATOR_HTTP_PORT"] == "5300"
    assert any("sqlcmd" in part for part in services["sqlserver"]["healthcheck"]["test"])
    assert "mongosh" in services["mongo"]["healthcheck"]["test"]
    # /api/ready, not /api/health: only the readiness check reaches the database (PostgreSQL down is unhealthy).
    assert any("/api/ready" in part for part in services["prefect"]["healthcheck"]["test"])
    assert services["prefect"]["environment"]["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] == "20"


def env_file_with(tmp_path: Path, **values: str | None) -> Path:
    """.env.example with ``values`` replaced (None: the line removed), written to ``tmp_path``."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        if name in values:
            if values[name] is not None:
                lines.append(f"{name}={values[name]}")
        else:
            lines.append(line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("value", ["N", "y", None])
def test_licences_must_be_accepted_with_exactly_y(tmp_path: Path, value: str | None) -> None:
    result = docker_compose("--env-file", str(env_file_with(tmp_path, ACCEPT_EULA=value)), "-f", str(COMPOSE), "config")
    assert result.returncode != 0, f"ACCEPT_EULA={value!r} was accepted"
    assert f"accept-eula-{value}.env" in result.stderr if value else "set ACCEPT_EULA=Y" in result.stderr, result.stderr


def test_licences_accepted_with_y_reach_both_licensed_containers(compose: dict) -> None:
    services = compose["services"]  # composed with ACCEPT_EULA=Y
    licensed = {name for name, svc in services.items() if "ACCEPT_EULA" in svc.get("environment", {})}
    assert licensed == {"servicebus", "sqlserver"}
    assert all(services[name]["environment"]["ACCEPT_EULA"] == "Y" for name in licensed)


def test_servicebus_emulator_config_declares_the_sidecars_topic(compose: dict) -> None:
    services = compose["services"]
    mount = next(v for v in services["servicebus"]["volumes"] if EMULATOR_CONFIG in v)
    host_path = Path(mount.split(":")[0])
    assert host_path == ROOT / "deploy" / "servicebus" / "Config.json"
    config = json.loads(host_path.read_text())["UserConfig"]
    assert config["Logging"]["Type"]
    [namespace] = config["Namespaces"]
    assert namespace["Name"] == "sbemulatorns"  # the only namespace name the emulator accepts
    topics = {t["Name"]: t for t in namespace["Topics"]}
    topic = topics[flags(services["sidecar"])["--servicebuseventprovider.topic"]]
    # The publisher relies on message-id de-duplication so that a retried /done never duplicates.
    assert topic["Properties"]["RequiresDuplicateDetection"] is True
    subscriptions = {s["Name"]: s for s in topic["Subscriptions"]}
    assert "all-events" in subscriptions and not subscriptions["all-events"].get("Rules")
    [rule] = subscriptions["file-discovered"]["Rules"]
    assert rule["Properties"]["CorrelationFilter"]["Properties"] == {"eventType": "file_discovered"}


def test_dockerfile_installs_the_lock_file_before_the_code() -> None:
    instructions = dockerfile_instructions()
    steps = [f"{k} {v}" for k, v in instructions]
    lock_copy = steps.index("COPY requirements.lock ./")
    lock_install = next(i for i, step in enumerate(steps) if "-r requirements.lock" in step)
    assert "--require-hashes" in steps[lock_install] and "--no-deps" in steps[lock_install]
    first_code = min(i for i, step in enumerate(steps) if step.startswith(("COPY sidecar", "COPY flows", "COPY pyproject")))
    assert lock_copy < lock_install < first_code, "the dependency layer must come before the code"
    # The package itself adds no dependency beyond the lock.
    project_install = next(step for step in steps[first_code:] if "pip install" in step)
    assert "--no-deps" in project_install


def test_dockerfile_runs_sidecar_as_non_root_with_health_check() -> None:
    instructions = dockerfile_instructions()
    values = dict(instructions)  # the last of each instruction wins, as in Docker
    assert values["FROM"].startswith("python:3.11.")
    user = values["USER"].split(":")[0]
    assert user not in ("root", "0") and user.isdigit()
    assert exec_form(values["ENTRYPOINT"]) == ["sidecar", "--host=0.0.0.0", "--requireprefectapi=true"]
    assert "/healthz" in values["HEALTHCHECK"] and "python" in values["HEALTHCHECK"]
    assert "SIDECAR_CONFIG_DIR=/opt/sidecar/conf" in " ".join(v for k, v in instructions if k == "ENV")
    copies = [v for k, v in instructions if k == "COPY"]
    assert "conf ./conf" in copies and any(v.startswith("sidecar ") for v in copies)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "sidecar", "flows", "dispatcher", "client", "conf",
                   "examples"):
        assert needed not in ignored
    for private in (".env", ".venv", ".git", ".dev"):
        assert private in ignored


def test_image_health_check_command_probes_healthz(idle_sidecar: SidecarProcess) -> None:
    command = exec_form(dict(dockerfile_instructions())["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]
    healthy = subprocess.run(argv, env={"SIDECAR_PORT": str(idle_sidecar.port)}, capture_output=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr
    nobody = subprocess.run(argv, env={"SIDECAR_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert nobody.returncode != 0
