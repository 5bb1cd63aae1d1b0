"""The typed configuration schema, registered with Hydra's ConfigStore.

The field names are the seed's flags (``spec/SIDECAR.md``): ``--context.eventid`` sets
``context.eventid``, and so on. Additions a real deployment needs follow the same style (``DESIGN.md``,
Configuration). This module holds the sidecar's own settings; each data-plane provider's settings
(``--azureblobprovider.*``, ...) are its package's ``Config``, added to :data:`SidecarConfig` by
``sidecar.dataplane.registry``, which also registers the config groups behind the provider switches
(``--azureblobprovider=true`` chooses the ``azure`` option of the ``azureblobprovider`` group).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Iterator

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sidecar.bounds import MiB, Bounds, check_bounds
from sidecar.dataplane import registry

# Namespace for the deterministic ids this sidecar derives (execution ids, child event ids), so a
# retried or restarted run derives the same ids and every upsert and publish stays idempotent.
ID_NAMESPACE = uuid.UUID("5b1d6a0e-6c3f-4c8e-9a57-0f2d8f3c1e11")


class LogLevel(str, Enum):
    """``--loglevel`` values, as in the seed."""

    debug = "debug"
    info = "info"
    warn = "warn"
    error = "error"


@dataclass
class ContextConfig:
    """The run's context: which module handles which event (``--context.*``)."""

    # The event this module run handles (Ion's dispatcher gives it).
    eventid: str = MISSING
    # The id shared by every event of one graph run; passed on to child events.
    correlationid: str = MISSING
    # The event that produced this one; empty for the first module of a graph.
    parenteventid: str = ""
    # The module's name: part of blob keys, run names and the producer of child events.
    name: str = "module"
    # The id this run's insight is stored under.
    # Derived from (eventid, name) when empty, so a restarted sidecar keys its insight the same way.
    executionid: str = ""

    def execution_id(self) -> str:
        """The execution id: ``executionid`` if set, else a UUID5 of (eventid, name)."""
        return self.executionid or str(uuid.uuid5(ID_NAMESPACE, f"{self.eventid}/{self.name}"))


@dataclass
class TransferConfig:
    """How blob transfers and retries run."""

    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "concurrency": Bounds(1), "tasks": Bounds(1), "retries": Bounds(0),
        "retrydelayseconds": Bounds(0, unit="s"),
    }

    # Files transferred at once, per /ready or /done (the blob provider bounds their memory).
    concurrency: int = 64
    # At most this many transfer task runs per flow run (each moves a batch of files of at least 64 MiB).
    tasks: int = 4
    # Prefect task retries for data-plane I/O (the one retry layer: providers do not retry); a timed-out wait is not retried.
    retries: int = 3
    # The wait before each retry, seconds.
    retrydelayseconds: float = 1.0
    # A Prefect global concurrency limit (by name) bounding transfer task runs across every sidecar of a
    # fleet: each takes one slot; empty: no fleet-wide bound. The limit must exist in the Prefect API.
    fleetlimit: str = ""


@dataclass
class CoreConfig:
    """The sidecar's own settings: :data:`SidecarConfig` adds one field per data-plane provider to
    make the whole configuration, which ``conf/config.yaml`` composes."""

    # maxeventbytes: at most Service Bus premium tier's 100 MB message limit (the standard tier's is 256 KiB).
    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "serverport": Bounds(1, 65535), "maxeventbytes": Bounds(1, 100 * MiB, unit="bytes"),
        "prefectstartuptimeoutseconds": Bounds(0, above=True, unit="s"),
    }

    context: ContextConfig = field(default_factory=ContextConfig)
    # The lowest level logged.
    loglevel: LogLevel = LogLevel.info
    # Also write log lines to this file (besides stderr).
    logfile: str = ""
    # The TCP port of the HTTP API.
    serverport: int = 8080
    # The address the HTTP API binds to; the module shares the pod's network, so loopback by default.
    host: str = "127.0.0.1"
    # The value every request's `secret` header must carry.
    sharedsecret: str = "${oc.env:SHARED_SECRET,''}"
    # The event types this module may publish, comma-separated.
    valideventtypes: list[str] = field(default_factory=list)
    # The volume shared with the module, holding in/ and out/ (development mode's default: ./ion).
    basedir: str = "/ion"
    # Local providers for every building block and debug dumps under devdir; no external service needed.
    development: bool = False
    # Where development providers keep blobs, documents, events and debug dumps.
    devdir: str = ".dev"
    # Largest event file accepted, bytes (Service Bus standard tier's message limit).
    maxeventbytes: int = 256 * 1024
    # How long /ready or /done waits for an unavailable Prefect API before answering 503, seconds.
    prefectstartuptimeoutseconds: float = 60.0
    # Refuse to start a Prefect server of its own when PREFECT_API_URL is unset (on in the Docker image).
    requireprefectapi: bool = False
    transfer: TransferConfig = field(default_factory=TransferConfig)


# The sidecar's settings plus one field per data-plane provider (``azureblobprovider``, ...), from the
# registry: ``cfg.azureblobprovider.containername`` is ``--azureblobprovider.containername``.
SidecarConfig = registry.schema(CoreConfig)

# Settings whose values never appear in --printconfig or a log line.
SECRET_KEYS = ("sharedsecret", *registry.secret_keys())

# Settings that have no usable default.
REQUIRED_KEYS = ("context.eventid", "context.correlationid", "sharedsecret")

# The provider flags of the seed, each a Hydra config group: option when true, option when false.
PROVIDER_GROUPS = registry.groups()


def check_core_bounds(cfg: CoreConfig) -> None:
    """Check the sidecar's own numeric settings against their ``BOUNDS`` (``sidecar.bounds``).

    Raises:
        SettingsError: naming the flag and its valid range.
    """
    check_bounds(cfg, "")
    check_bounds(cfg.transfer, "transfer.")


def lookup(cfg: SidecarConfig, dotted: str) -> Any:
    """Return the value at a dotted key such as ``"context.eventid"``."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def secret_values(cfg: SidecarConfig) -> Iterator[str]:
    """Yield the non-empty secret values of ``cfg`` (for redaction), longest first."""
    values = {str(lookup(cfg, key)) for key in SECRET_KEYS}
    yield from sorted((v for v in values if v), key=len, reverse=True)


def register() -> None:
    """Register the schema as ``sidecar_schema`` and the providers' config groups (``sidecar_providers``)
    so ``conf/config.yaml`` can extend them."""
    ConfigStore.instance().store(name="sidecar_schema", node=SidecarConfig)
    registry.register_groups()
