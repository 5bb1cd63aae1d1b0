"""The graph file: which modules run, for which event types, how often and for how long.

A graph file is YAML composed with Hydra (``hydra.compose``: defaults lists, config groups beside the
file, and ``key=value`` overrides from the command line all work) and checked against the typed schema
below (:class:`GraphConfig`). Example (``examples/hash-files/graph.yaml``)::

    initial:
      type: graph_started          # the seed event's type; one module subscribes to it
      files: ./data                # optional: a folder whose files the seed event carries
      data: {label: demo}          # optional: pairs the first module finds in in/meta.json
    modules:
      discover:
        command: [python, discover.py]
        subscribes: [graph_started]
        valideventtypes: [file_discovered]
        concurrency: 1
        timeoutseconds: 60
        attempts: 3

Relative paths (``initial.files``, a module's ``cwd``) are relative to the graph file's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class GraphError(Exception):
    """The graph file is invalid; the message names the file and the key."""


@dataclass
class InitialEvent:
    """The event a graph run starts from (Ion's first event of a correlation)."""

    # The seed event's type; exactly the modules subscribed to it run first.
    type: str = MISSING
    # A folder whose files (subfolders included) the seed event carries into the first module's in/data.
    # Empty: none. Relative to the graph file's folder; --files on the command line wins.
    files: str = ""
    # Key/value pairs the first module finds in in/meta.json; --data key=value adds to them.
    data: dict[str, str] = field(default_factory=dict)


@dataclass
class ModuleSpec:
    """One module of the graph: how to start it and which events it handles."""

    # The command that runs the module (argv). "python" means the dispatcher's own interpreter.
    command: list[str] = MISSING
    # The working directory of the command; relative to the graph file's folder.
    cwd: str = "."
    # Extra environment of the command (SHARED_SECRET, SIDECAR_PORT and SIDECAR_BASEDIR are set for it).
    env: dict[str, str] = field(default_factory=dict)
    # The event types this module handles: one module run per event of these types.
    subscribes: list[str] = field(default_factory=list)
    # The event types it may publish (its sidecar's --valideventtypes).
    valideventtypes: list[str] = field(default_factory=list)
    # Module runs of this module at once (sidecar and command together).
    concurrency: int = 1
    # How long one attempt's command may run before it is killed, seconds (from its start, which
    # follows its sidecar's start-up).
    timeoutseconds: float = 600.0
    # How long the module's sidecar may take to start (answer /healthz), seconds; a slower start is a
    # failed attempt. Not counted in timeoutseconds.
    startupseconds: float = 180.0
    # Attempts per event before the event goes to the dead-letter folder (1: no retry).
    attempts: int = 3
    # The back-off before the second attempt, seconds; doubled before each further one.
    retrydelayseconds: float = 1.0


@dataclass
class GraphConfig:
    """A graph: the seed event and the modules, by name (the name is the sidecar's --context.name)."""

    initial: InitialEvent = field(default_factory=InitialEvent)
    modules: dict[str, ModuleSpec] = field(default_factory=dict)


@dataclass
class Graph:
    """A checked graph: :class:`GraphConfig` plus the file it came from (for relative paths)."""

    config: GraphConfig
    path: Path

    @property
    def folder(self) -> Path:
        return self.path.parent

    def subscribers(self, event_type: str) -> list[str]:
        """Names of the modules subscribed to ``event_type``, in file order."""
        return [name for name, spec in self.config.modules.items() if event_type in spec.subscribes]

    def resolve(self, relative: str) -> Path:
        """``relative`` against the graph file's folder (an absolute path stays as it is)."""
        return (self.folder / Path(relative).expanduser()).resolve()


def load_graph(path: str | Path, overrides: list[str] = ()) -> Graph:
    """Compose the graph file at ``path`` with Hydra, apply ``overrides`` (``modules.hash.attempts=5``)
    and check it against :class:`GraphConfig`.

    Raises:
        GraphError: missing file, YAML or override error, unknown key, wrong type, a rule below broken;
            the message names the file and key.
    """
    path = Path(path).resolve()
    shown = str(path)
    if not path.is_file():
        raise GraphError(f"{shown}: no such graph file")
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            raw = compose(config_name=path.stem, overrides=list(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(GraphConfig), raw)
        config: GraphConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).strip().splitlines()[0]
        raise GraphError(f"{shown}: {f'key {key}: ' if key else ''}{first}") from None
    graph = Graph(config, path)
    _check(graph, shown)
    return graph


def _check(graph: Graph, shown: str) -> None:
    cfg = graph.config
    if not cfg.initial.type.strip():
        raise GraphError(f"{shown}: key initial.type: the seed event needs a type")
    if not cfg.modules:
        raise GraphError(f"{shown}: key modules: the graph has no module")
    for name, spec in cfg.modules.items():
        key = f"modules.{name}"
        if not _NAME.fullmatch(name):
            raise GraphError(f"{shown}: key {key}: a module name is 1-63 letters, digits, '_', '.' or '-'")
        if not spec.command or not all(isinstance(a, str) and a for a in spec.command):
            raise GraphError(f"{shown}: key {key}.command: an argv list of non-empty strings is required")
        if not spec.subscribes:
            raise GraphError(f"{shown}: key {key}.subscribes: a module subscribes to at least one event type")
        if spec.concurrency < 1:
            raise GraphError(f"{shown}: key {key}.concurrency: at least 1, not {spec.concurrency}")
        if spec.attempts < 1:
            raise GraphError(f"{shown}: key {key}.attempts: at least 1, not {spec.attempts}")
        if spec.timeoutseconds <= 0:
            raise GraphError(f"{shown}: key {key}.timeoutseconds: more than 0 seconds, not {spec.timeoutseconds}")
        if spec.startupseconds <= 0:
            raise GraphError(f"{shown}: key {key}.startupseconds: more than 0 seconds, not {spec.startupseconds}")
        if spec.retrydelayseconds < 0:
            raise GraphError(f"{shown}: key {key}.retrydelayseconds: not negative, not {spec.retrydelayseconds}")
        for event_type in [*spec.subscribes, *spec.valideventtypes]:
            if not event_type.strip() or "," in event_type:
                raise GraphError(f"{shown}: key {key}: event type {event_type!r} is empty or has a comma")
        cwd = graph.resolve(spec.cwd)
        if not cwd.is_dir():
            raise GraphError(f"{shown}: key {key}.cwd: {cwd} is not a folder")
    if not graph.subscribers(cfg.initial.type):
        raise GraphError(f"{shown}: key initial.type: no module subscribes to {cfg.initial.type!r}")


def as_dict(value: Any) -> Any:
    """A schema object as plain JSON-able data (for flow-run parameters and dead-letter records)."""
    return OmegaConf.to_container(OmegaConf.structured(value), resolve=True)
