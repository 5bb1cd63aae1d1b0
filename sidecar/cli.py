"""Command line: the original Ion Sidecar's flags and plain Hydra overrides -> composed config -> uvicorn.

Hydra's own argv parser rejects ``--flag=value``, so this module translates the original Ion Sidecar's
flags (README.md: Configuration) before composing with Hydra's Compose API (which changes no working
directory and writes no ``outputs/`` folder):

- ``--azureblobprovider=true`` (and the other provider flags) choose an option of that config group:
  ``azure``/``mongo``/``servicebus`` when true, ``dev`` when false;
- every other ``--key=value`` (or ``--key value``) sets ``key`` after composition, taken as a literal
  string (so secrets and connection strings need no quoting, and ``${...}`` is text, never an
  interpolation: see :func:`literal`), converted and checked by the schema;
- ``--valideventtypes=a,b`` is split on commas;
- the switches (``--printconfig``, ``--development``, the provider flags) may stand alone (true) or
  take ``true``/``false`` as the next argument (``--printconfig true``);
- arguments without ``--`` are Hydra overrides, e.g. ``context.eventid=e1`` or ``transfer.tasks=2``, in
  Hydra's override grammar (quoting, ``${...}`` interpolation); use ``--key=value`` for literal text;
  ``printconfig=true`` is taken as ``--printconfig=true`` (it is a command, not a setting).

An unknown setting, a missing required value (all of them named at once), a secret too short to mask in
logs or an unusable ``--basedir`` stops start-up with one line naming it (exit code 2).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sidecar import flags
from sidecar.logs import MIN_SECRET_CHARS
from sidecar.config import (
    PROVIDER_GROUPS,
    REQUIRED_KEYS,
    SECRET_KEYS,
    SidecarConfig,
    check_core_bounds,
    lookup,
    register,
)
from sidecar.dataplane import registry, topics
from sidecar.errors import SettingsError
from sidecar.paths import segment_problem, shown, text_problem
from sidecar.sharedsecret import secret_problem

EXIT_USAGE = 2
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# Flags that are true when given without a value.
_SWITCHES = {"printconfig", "development", *PROVIDER_GROUPS}

USAGE = """usage: sidecar [--key=value ...] [hydra.override=value ...]

Every setting below is a flag (--key=value or --key value) and a Hydra override (key=value); the
original Ion Sidecar's flags work unchanged. SHARED_SECRET in the environment supplies --sharedsecret.
Secrets must be at least 8 characters long (shorter ones cannot be masked in logs without masking
ordinary words). A bad or missing setting stops start-up with one line naming it (exit code 2).
"""


class UsageError(Exception):
    """A command line or configuration problem; the message is the one line printed."""


@dataclass
class Parsed:
    """The command line split into Hydra overrides, literal values and ``--printconfig``."""

    overrides: list[str] = field(default_factory=list)
    values: list[tuple[str, str]] = field(default_factory=list)
    printconfig: bool = False
    # How each override was typed, where it came from a flag (``azureblobprovider=azure``: ``--azureblobprovider=true``).
    typed: dict[str, str] = field(default_factory=dict)


def _as_bool(flag: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise UsageError(f"--{flag} takes true or false, not '{value}'")


def parse_args(argv: list[str]) -> Parsed:
    """Split ``argv`` (without the program name) as described in the module docstring.

    Raises:
        UsageError: a flag without its value, or a provider flag that is not true/false.
    """
    parsed = Parsed()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            name, sep, value = arg.partition("=")
            if sep and name.lstrip("+~") == "printconfig":
                parsed.printconfig = _as_bool("printconfig", value)
            else:
                parsed.overrides.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        if not key:
            raise UsageError(f"'{arg}' is not a flag")
        if not sep:
            if key in _SWITCHES:
                # `--printconfig true` as well as a bare `--printconfig`.
                is_bool = args and args[0].strip().lower() in _TRUE | _FALSE
                value = args.pop(0) if is_bool else "true"
            elif args and not args[0].startswith("--"):
                value = args.pop(0)
            else:
                raise UsageError(f"--{key} needs a value (--{key}=VALUE)")
        if key == "printconfig":
            parsed.printconfig = _as_bool(key, value)
        elif key in PROVIDER_GROUPS:
            on, off = PROVIDER_GROUPS[key]
            override = f"{key}={on if _as_bool(key, value) else off}"
            parsed.overrides.append(override)
            parsed.typed.setdefault(override, f"--{key}={value}")
        else:
            parsed.values.append((key, value))
    return parsed


def check_provider_choices(parsed: Parsed) -> None:
    """Let a provider be chosen only by its switch (``--azureblobprovider=true|false``) or its config
    group's choice (``azureblobprovider=azure|dev``), once: a production sidecar silently routed to the
    development providers loses every output it commits.

    Raises:
        UsageError: ``{flag}.enabled`` set as a flag or override (it is not a setting: the group choice
            sets it), a group choice deleted (``~azureblobprovider``) or moved (``azureblobprovider@pkg``),
            or two different choices of one group (naming both as typed).
    """
    for key, _ in parsed.values:
        if _provider_enabled_key(key):
            raise UsageError(f"unknown flag --{key} (choose the provider with --{key.split('.')[0]}=true|false)")
    chosen: dict[str, tuple[str, str]] = {}  # group -> (its choice, the override that made it)
    for override in parsed.overrides:
        name, _, value = override.partition("=")
        key = name.strip().lstrip("+~").strip()
        group = re.split(r"[.@]", key, maxsplit=1)[0]
        if group not in PROVIDER_GROUPS:
            continue
        if _provider_enabled_key(key):
            raise UsageError(f"unknown setting '{key}' (choose the provider with --{group}=true|false "
                             f"or {group}={'|'.join(PROVIDER_GROUPS[group])})")
        if "." in key:
            continue  # one of the provider's settings
        if name.strip().startswith("~") or "@" in key:
            raise UsageError(f"'{override}' cannot delete or move the choice of the {group} provider "
                             f"(use --{group}=true|false)")
        choice = value.strip()
        first_choice, first = chosen.setdefault(group, (choice, override))
        if first_choice != choice:
            raise UsageError(f"{parsed.typed.get(first, first)} contradicts {parsed.typed.get(override, override)}: "
                             f"choose the {group} provider once")


def _provider_enabled_key(key: str) -> bool:
    """Whether the dotted ``key`` is a provider's ``enabled`` (set only by its group choice)."""
    group, _, leaf = key.strip().lstrip("+~").partition(".")
    return group.split("@")[0] in PROVIDER_GROUPS and leaf.split(".")[0].strip() == "enabled"


def config_dir() -> Path:
    """The Hydra config folder: ``SIDECAR_CONFIG_DIR``, else ``conf/`` beside the packages."""
    return Path(os.environ.get("SIDECAR_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "conf")


def compose_config(argv: list[str]) -> tuple[SidecarConfig, Parsed]:
    """Compose the configuration for ``argv``.

    Returns:
        The typed config (interpolations such as ``SHARED_SECRET`` resolved) and the parsed argv.

    Raises:
        UsageError: unknown setting, bad value, missing required value or contradictory settings.
    """
    parsed = parse_args(argv)
    check_provider_choices(parsed)
    register()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=parsed.overrides)
    except HydraException as exc:
        raise UsageError(_describe_hydra_error(exc, parsed.overrides)) from None
    for key, value in parsed.values:
        _set(cfg, key, value)
    try:
        missing = missing_settings(cfg)
        if missing:
            named = ", ".join(f"--{key}" + (" (or SHARED_SECRET)" if key == "sharedsecret" else "") for key in missing)
            raise UsageError(f"missing required setting{'s' if len(missing) > 1 else ''}: {named}")
        typed: SidecarConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        # An interpolation in a YAML value or a plain Hydra override (``key=${...}``) that cannot resolve.
        raise UsageError(f"cannot resolve {_node_name(exc)}: {str(exc).splitlines()[0]}") from None
    if typed.development and not _given(parsed, "basedir"):
        # The image's /ion is a mounted volume; on a developer's machine it would be the file system's root.
        typed.basedir = DEVELOPMENT_BASEDIR
    check_values(typed)
    check(typed)
    return typed, parsed


# Development mode's module folder when --basedir is not given: inside the working directory.
DEVELOPMENT_BASEDIR = "ion"


def _given(parsed: Parsed, key: str) -> bool:
    """Whether ``key`` was set on the command line (as a flag or a Hydra override)."""
    return any(k == key for k, _ in parsed.values) or any(
        o.partition("=")[0].lstrip("+~") == key for o in parsed.overrides)


def missing_settings(cfg: DictConfig) -> list[str]:
    """The dotted keys of every required setting ``cfg`` lacks, in flag-reference order: the always
    required ones (:data:`~sidecar.config.REQUIRED_KEYS`) and those an enabled provider requires."""
    required = [*REQUIRED_KEYS, *registry.required_keys(cfg)]
    blank = []
    for key in required:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None or not str(value).strip():
            blank.append(key)
    return blank


def _node_name(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    return f"setting {key}" if key else "a setting"


def check_values(cfg: SidecarConfig) -> None:
    """Refuse values that cannot be used as given (``README``: the folder contract's naming rules):

    - any text setting that is not valid UTF-8 (bytes of the command line or environment that did not
      decode), since it could be neither logged nor sent;
    - ``context.eventid`` and ``context.name``, each one segment of every blob key and of the
      development folders, must be a good blob-name segment (``sidecar.paths.segment_problem``);
    - the shared secret must be one HTTP can carry (``sidecar.sharedsecret.secret_problem``).

    Raises:
        UsageError: one line naming the setting (never a secret's value).
    """
    for key, value in _text_settings(cfg):
        if text_problem(value):
            shown_value = "" if key in SECRET_KEYS else f"={shown(value)}"
            raise UsageError(f"--{key}{shown_value} is not valid UTF-8")
    for key in ("context.eventid", "context.name"):
        value = lookup(cfg, key)
        problem = segment_problem(value)
        if problem:
            raise UsageError(f"--{key}={shown(value)} cannot be part of a blob name: it {problem}")
    problem = secret_problem(cfg.sharedsecret)
    if problem:
        raise UsageError(f"the shared secret (--sharedsecret or SHARED_SECRET) {problem}")


def _text_settings(cfg: object, prefix: str = ""):
    """(dotted key, value) for every text value of ``cfg``, list items included."""
    for item in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, item.name)
        key = prefix + item.name
        if dataclasses.is_dataclass(value):
            yield from _text_settings(value, key + ".")
        elif isinstance(value, str):
            yield key, value
        elif isinstance(value, list):
            yield from ((key, v) for v in value if isinstance(v, str))


def _describe_hydra_error(exc: HydraException, overrides: list[str]) -> str:
    """One line for a Hydra composition error, naming the override at fault. An override of a secret
    setting (:data:`~sidecar.config.SECRET_KEYS`) is named by its key only: Hydra's messages quote the
    override or fragments of its value, so none of them is shown for it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    hint = "quote values that contain '=' or ',', as key='a=b', or use --key=value"
    if isinstance(exc, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_overrides([override])
            except OverrideParseException:
                key = _override_key(override)
                if key in SECRET_KEYS:
                    return f"cannot parse the override of {key} (the value of a secret is not shown; {hint})"
                return f"cannot parse override '{override}': {lines[0]} ({hint})"
    if isinstance(exc, MissingConfigException) and "Available options" in str(exc):
        options = [line for line in lines[lines.index(next(l for l in lines if l.startswith("Available"))) + 1:]
                   if "=" not in line and not line.startswith("Config search path")]
        return _without_secrets(f"{lines[0]} (available: {', '.join(options)})", overrides)
    for override in overrides:
        key = _override_key(override)
        if key in SECRET_KEYS and key in str(exc):
            return f"cannot apply the override of {key} (the value of a secret is not shown; {hint})"
    return _without_secrets(lines[0], overrides)


def _override_key(override: str) -> str:
    """The dotted key of a Hydra override (``+~`` prefixes and blanks dropped)."""
    return override.partition("=")[0].strip().lstrip("+~").strip()


def _without_secrets(message: str, overrides: list[str]) -> str:
    """``message`` with the value of every secret override replaced by ``***`` (a last guard)."""
    for override in overrides:
        value = override.partition("=")[2]
        if _override_key(override) in SECRET_KEYS and value.strip():
            message = message.replace(override, f"{_override_key(override)}=***").replace(value, "***")
    return message


def literal(value: str) -> str:
    """``value`` escaped for OmegaConf so that it stays exactly the string given: ``${`` becomes
    ``\\${`` and the backslashes right before it are doubled (OmegaConf's grammar, "Escaping
    interpolations"); no other character is special in a top-level string."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def _set(cfg: DictConfig, key: str, value: str) -> None:
    """Set ``key`` to the literal ``value`` of ``--key=value`` (typed and checked by the schema)."""
    node_value: object = literal(value)
    shown_value = "***" if key in SECRET_KEYS else value  # as messages show it
    if key == "valideventtypes":
        node_value = [literal(v.strip()) for v in value.split(",") if v.strip()]
    elif "${" in value:
        # OmegaConf accepts any interpolation-looking text in a typed node and fails only when it
        # resolves it; a number, a switch or a level never holds "${", so say so here, naming the flag.
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if current is not None and type(current) is not str:
            raise UsageError(f"--{key}={shown_value}: Value '{shown_value}' could not be converted to "
                             f"{type(current).__name__}")
    try:
        OmegaConf.update(cfg, key, node_value, merge=False, force_add=False)
    except OmegaConfBaseException as exc:
        if "not in struct" in str(exc) or "Key '" in str(exc) and "not" in str(exc):
            raise UsageError(f"unknown flag --{key}") from None
        raise UsageError(f"--{key}={shown_value}: {str(exc).splitlines()[0]}") from None


def check(cfg: SidecarConfig) -> None:
    """Reject contradictory or incomplete settings (``DESIGN.md``: Configuration); each enabled
    provider's own rules are its ``Config.check`` (``sidecar.dataplane.registry.check``).

    Raises:
        UsageError: naming the setting.
    """
    enabled = [p.flag for p in registry.enabled(cfg)]
    if cfg.development and enabled:
        raise UsageError(f"--development=true contradicts --{enabled[0]}=true: development mode uses local providers")
    try:
        check_core_bounds(cfg)
        registry.check(cfg)  # each enabled provider validates its own settings
        # Development mode too: its events are files, but a name the real bus refuses must fail here first.
        topics.check_settings(cfg.servicebuseventprovider.topic, list(cfg.valideventtypes))
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def check_startup(cfg: SidecarConfig) -> None:
    """What must hold before serving, beyond the configuration's own consistency: every secret is long
    enough to mask in logs (:data:`MIN_SECRET_CHARS`) and ``cfg.basedir`` can be created and written.

    Raises:
        UsageError: naming the secret's flag (never its value) or the folder and the OS error.
    """
    for key in SECRET_KEYS:
        value = str(lookup(cfg, key) or "")
        if value and len(value) < MIN_SECRET_CHARS:
            source = " (SHARED_SECRET)" if key == "sharedsecret" else ""
            raise UsageError(f"--{key}{source} is shorter than {MIN_SECRET_CHARS} characters: logs could not mask it "
                             "without masking ordinary words; use a longer secret")
    basedir = Path(cfg.basedir)
    try:
        basedir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=basedir):
            pass
    except OSError as exc:
        raise UsageError(f"--basedir={cfg.basedir} cannot be used: {exc.strerror or exc} "
                         "(the folder must be creatable and writable)") from None


def check_port(host: str, port: int) -> None:
    """Stop start-up when ``host:port`` cannot be listened on (another process holds the port, a port
    below 1024 without the right, an address of another machine), before the development Prefect server
    or anything else is started. Binds each address ``host`` resolves to as uvicorn's server will (with
    ``SO_REUSEADDR``, as asyncio does) and closes it at once; port 0 (any free port) is not checked.

    Raises:
        UsageError: naming ``--serverport`` (or ``--host``), the address and the OS's reason, with the
            flag that picks another port.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host={host} cannot be listened on: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                where = f"{host}:{port}" if family != socket.AF_INET6 else f"[{host}]:{port}"
                if exc.errno == errno.EADDRINUSE:
                    raise UsageError(f"--serverport={port}: another process is already listening on {where}; "
                                     f"stop it, or pick another port with --serverport "
                                     f"(e.g. --serverport={port + 1 if port < 65535 else 8081})") from None
                raise UsageError(f"--host={host} --serverport={port}: cannot listen on {where}: "
                                 f"{exc.strerror or exc}") from None


def redacted_yaml(cfg: SidecarConfig) -> str:
    """``cfg`` as YAML with every non-empty secret shown as ``***`` (for ``--printconfig``).

    Values are printed as they are, never resolved: text holding ``${...}`` is literal (dumped with
    PyYAML from the typed config, not through OmegaConf, which would parse it as an interpolation).
    """
    # Enums (log level, credential kinds) are printed as their values.
    plain = dataclasses.asdict(cfg, dict_factory=lambda pairs: {k: v.value if isinstance(v, Enum) else v
                                                                for k, v in pairs})
    for key in SECRET_KEYS:
        *parents, leaf = key.split(".")
        owner = plain
        for part in parents:
            owner = owner[part]
        if owner[leaf]:
            owner[leaf] = "***"
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sidecar`` console script: compose the config, then serve until stopped."""
    argv = sys.argv[1:] if argv is None else argv
    # Prefect's server telemetry fights its own SQLite writes ("database is locked"); it is not ours to send.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\nSettings:\n" + flags.text(), end="")
        return
    try:
        cfg, parsed = compose_config(argv)
    except UsageError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if parsed.printconfig:
        print(redacted_yaml(cfg), flush=True)
    try:
        check_startup(cfg)
    except UsageError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    try:
        check_port(cfg.host, cfg.serverport)
    except UsageError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    # Imported only now: it loads Prefect, which takes seconds, and a usage error needs none of it.
    from sidecar.orchestration import PrefectApiRequired

    try:
        serve(cfg)
    except PrefectApiRequired as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def serve(cfg: SidecarConfig) -> None:
    """Build the runtime for ``cfg`` and run the API under uvicorn until SIGINT/SIGTERM.

    Sized for a container that may be short of file descriptors (``sidecar.serving``). On SIGTERM the
    running ``/ready`` or ``/done`` is cancelled and its callers answered 503 (JSON, retry: the run's
    record lets the successor resume), then the sidecar stops gracefully and exits 0.
    """
    from flows.runtime import Runtime
    from sidecar.api import create_app
    from sidecar.logs import configure_logging
    from sidecar.serving import run_server

    configure_logging(cfg)
    app = create_app(Runtime.for_config(cfg))
    run_server(app, cfg.host, cfg.serverport, on_stop=app.state.stop, keep_running=app.state.prefect.reporting)
