"""The one registry of data-plane providers: which package provides which building block, under which flag.

Design (``DESIGN.md``: Layout; the fsspec ``known_implementations`` shape): a provider is named here by
its seed flag and its package's dotted path, and nothing else in the sidecar names a provider. From
this list come

- the configuration schema: one settings field per provider (its package's ``Config``), so
  ``--azureblobprovider.containername`` is ``cfg.azureblobprovider.containername`` (:func:`schema`);
- the Hydra config groups behind the seed's switches: ``--azureblobprovider=true`` chooses the option
  ``azure`` of group ``azureblobprovider``, ``false`` the option ``dev`` (:func:`register_groups`);
- the secret settings (redacted in ``--printconfig`` and every log line) and the required ones;
- each provider's validation, run at start-up (:func:`check`);
- the data plane itself (:func:`create`): per building block the enabled provider's factory, else the
  development provider's. Packages are imported when their settings are needed and their service
  libraries only when their factory runs, as fsspec imports a protocol's class on first use.

Hydra's ``_target_`` instantiation was the other choice; it would put a class path into every
``--printconfig`` and YAML file and let a config name any class, where the seed's flags are fixed
switches. See ``sidecar/providers/__init__.py`` for what a provider package holds.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.errors import SettingsError

# The building blocks; each field of the data plane (sidecar.dataplane.DataPlane) holds a provider of one.
BLOBS, DOCUMENTS, EVENTS = "blobs", "documents", "events"
# The option of every provider's config group that means "off" (the development provider).
OFF = "dev"


@dataclass(frozen=True)
class Provider:
    """One registry entry.

    Attributes:
        flag: the seed's switch (``--azureblobprovider=true``), the config group and the settings' prefix.
        option: the group's option that means "on" (``sidecar azureblobprovider=azure``).
        block: :data:`BLOBS`, :data:`DOCUMENTS` or :data:`EVENTS`.
        package: the provider's package (``sidecar.providers.azureblob``): ``Config`` and ``create``.
    """

    flag: str
    option: str
    block: str
    package: str

    def module(self) -> ModuleType:
        """The provider's package, imported on first use (its service library is not: see ``create``)."""
        return importlib.import_module(self.package)


# The providers a configuration can switch on, one line each; the flag-table order follows this order.
PROVIDERS = (
    Provider("azureblobprovider", "azure", BLOBS, "sidecar.providers.azureblob"),
    Provider("mongodbdocprovider", "mongo", DOCUMENTS, "sidecar.providers.mongo"),
    Provider("servicebuseventprovider", "servicebus", EVENTS, "sidecar.providers.servicebus"),
)

# The provider of each building block whose real provider is not switched on (no settings of its own).
DEVELOPMENT = {
    BLOBS: "sidecar.providers.localblob",
    DOCUMENTS: "sidecar.providers.jsonfiles",
    EVENTS: "sidecar.providers.eventfiles",
}


def schema(core: type) -> type:
    """The configuration schema: the dataclass ``core`` (the sidecar's own settings) plus one field per
    provider, named by its flag, holding its ``Config``. The result is called ``SidecarConfig``."""
    fields = [(p.flag, p.module().Config, dataclasses.field(default_factory=p.module().Config)) for p in PROVIDERS]
    made = dataclasses.make_dataclass("SidecarConfig", fields, bases=(core,))
    made.__module__ = core.__module__
    made.__doc__ = "The whole configuration: the sidecar's own settings and one field per data-plane provider."
    return made


def groups() -> dict[str, tuple[str, str]]:
    """``{flag: (option when on, option when off)}`` for every provider's switch."""
    return {p.flag: (p.option, OFF) for p in PROVIDERS}


def register_groups() -> None:
    """Register each provider's config group in Hydra's ConfigStore: options ``{option}`` (enabled)
    and ``dev`` (disabled), and the node ``sidecar_providers`` whose defaults list chooses ``dev`` for
    every group (``conf/config.yaml`` lists it), so ``sidecar azureblobprovider=azure`` works."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for p in PROVIDERS:
        store.store(group=p.flag, name=p.option, node={"enabled": True})
        store.store(group=p.flag, name=OFF, node={"enabled": False})
    store.store(name="sidecar_providers", node={"defaults": [{p.flag: OFF} for p in PROVIDERS]})


def secret_keys() -> tuple[str, ...]:
    """The dotted keys of every provider's secret settings (``{flag}.{field}``)."""
    return tuple(f"{p.flag}.{name}" for p in PROVIDERS for name in p.module().Config.SECRETS)


def required_keys(cfg: Any) -> list[str]:
    """The dotted keys the enabled providers of ``cfg`` (typed, or a DictConfig) require."""
    return [f"{p.flag}.{name}" for p in PROVIDERS if _get(_get(cfg, p.flag), "enabled")
            for name in p.module().Config.REQUIRED]


def enabled(cfg: Any) -> list[Provider]:
    """The providers ``cfg`` switches on."""
    return [p for p in PROVIDERS if getattr(cfg, p.flag).enabled]


def check(cfg: Any) -> None:
    """Run the validation of every enabled provider of the typed ``cfg``: its numeric settings against
    their ``BOUNDS`` (``sidecar.bounds``), then its ``Config.check``.

    Raises:
        SettingsError: the first problem, naming the flag; or two enabled providers of one block.
    """
    from sidecar.bounds import check_bounds

    on = enabled(cfg)
    for p in on:
        other = next((q for q in on if q.block == p.block and q is not p), None)
        if other is not None:
            raise SettingsError(f"--{p.flag}=true contradicts --{other.flag}=true: both provide the {p.block}")
        settings = getattr(cfg, p.flag)
        check_bounds(settings, f"{p.flag}.")
        settings.check()


def create(cfg: Any, block: str, devdir: Path) -> Any:
    """The provider of ``block`` for the typed ``cfg`` (checked by :func:`check`): the enabled one's
    ``create(settings, devdir)``, else the development provider's ``create(None, devdir)``. Opens no
    connection."""
    chosen = [p for p in enabled(cfg) if p.block == block]
    if chosen:
        return chosen[0].module().create(getattr(cfg, chosen[0].flag), devdir)
    return importlib.import_module(DEVELOPMENT[block]).create(None, devdir)


def _get(node: Any, key: str) -> Any:
    return node.get(key) if hasattr(node, "get") else getattr(node, key, None)
