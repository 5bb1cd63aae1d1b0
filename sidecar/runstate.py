"""The run's record on the module's volume, so a restarted sidecar resumes the run it was serving.

``DESIGN.md`` (The sidecar's lifecycle, Restarts): on Ion a sidecar is a container that Kubernetes may
kill (OOM, eviction, a liveness probe) and start again with the same arguments on the same volume
while the module works. The record lives beside ``in/`` and ``out/``, never inside them:
``{basedir}/.sidecar/run.json``, written atomically (temp file, fsync, rename, fsync of the folder).

It holds the run's identity (event id, module name), its phase (new, ready, done), the summary of each
step that succeeded, the ids of the child events the event bus accepted (recorded batch by batch, right
after the broker accepted each), ``closed``: set when the sidecar stopped gracefully after ``/done``
succeeded, and ``unreported``: the flow runs this volume's sidecar started whose final state the Prefect
API has not recorded yet (recorded as soon as the API created the flow run, before it is proposed Running,
removed once the final state is reported). A sidecar that finds some at start-up reports them as soon as the API answers
(``sidecar.orchestration``): Crashed for a flow run whose process was killed mid-call, or the final state
the dead process knew but could not report. Unlike the rest of the record, they outlive a fresh run.

The one rule (README, Restarts): **a sidecar resumes the recorded run when the record names its event
id and module name and the run is open; ``/ready`` on no record, another run's record, or a closed
run starts a fresh run** (``in/`` and ``out/`` emptied, inputs staged again). So:

- a killed sidecar (SIGKILL, OOM, or SIGTERM before ``/done`` succeeded) leaves an open record: its
  successor answers ``/done`` without a new ``/ready``, a repeated ``/ready`` with the kept summary
  (outputs untouched), and publishes no event recorded as published;
- a module author re-running the same ids in development mode starts afresh: ``scripts/dev`` stopped
  with Ctrl-C after ``/done`` closed the run, and a module that deletes its base folder before
  ``/ready`` (as Ion's example module does) deletes the record with it.

The window left: a publish whose outcome the sidecar never learns: a crash after the broker accepted a
batch and before its ids were recorded, a publish past ``publishtimeoutseconds`` whose transfer still
reached the broker, a connection lost after the transfer went out. The ids of each batch are recorded in
``sending`` before its transfer, so such a batch is recorded as ``uncertain`` ("may have been
delivered"); the retry publishes it again with the same message ids (the child event ids), and Service
Bus duplicate detection drops them; a topic without it delivers that batch twice. The sidecar never
skips a resend it cannot prove was delivered: a lost event is worse than a duplicate.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, Field, ValidationError

from sidecar import crashpoints
from sidecar.errors import VolumeError

log = logging.getLogger(__name__)

# The record's folder under the base directory, and the record's file name in it.
RECORD_DIR = ".sidecar"
RECORD_FILE = "run.json"


class RunRecord(BaseModel):
    """What a restarted sidecar needs to resume a run (see the module docstring)."""

    eventId: str
    name: str
    phase: Literal["new", "ready", "done"] = "new"
    ready: dict[str, Any] | None = None  # the /ready summary (ReadySummary as JSON)
    done: dict[str, Any] | None = None  # the /done summary (DoneSummary as JSON)
    # out/ when the committed /done was called (ModuleLayout.fingerprint: name -> layout.file_version), so a
    # repeated /done tells an unchanged retry (same summary) from outputs written after the commit (409).
    # Recorded at the start of each /done attempt while no child event was sent yet: an attempt after some
    # were (a retry, a restarted sidecar) finds out/ as the one that sent them did, or gets a 409.
    committed: dict[str, list[int]] | None = None
    published: list[str] = Field(default_factory=list)  # child event ids the event bus accepted
    # Child event ids handed to the event bus whose answer has not come yet (recorded before the transfer).
    sending: list[str] = Field(default_factory=list)
    # Child event ids whose publish ended without the bus's answer (a timeout, a lost connection, a killed
    # sidecar): the broker may have received them, and a retry sends them again under the same message ids.
    uncertain: list[str] = Field(default_factory=list)
    closed: bool = False  # the sidecar stopped gracefully after /done succeeded
    # flow run id -> the final state to report ({"type": "COMPLETED"|"FAILED"|..., "message": ...}),
    # or None until its body ends (a flow run left so by a dead process is reported Crashed).
    unreported: dict[str, dict[str, str] | None] = Field(default_factory=dict)


class RunStore:
    """Reads and writes the record of the run ``(event_id, name)`` under ``basedir``.

    ``record`` is the run as this process knows it; :meth:`refresh` reloads it from the volume, the
    only memory that outlives the process. Every write is atomic and durable (fsync) before it returns.

    Raises (every writing method): :class:`~sidecar.errors.VolumeError` naming ``.sidecar/run.json``
    when the volume refuses the write (full, read-only, permissions).
    """

    def __init__(self, basedir: Path, event_id: str, name: str):
        self.basedir = basedir
        self.event_id = event_id
        self.name = name
        self.path = basedir / RECORD_DIR / RECORD_FILE
        self.record = self.fresh(unreported={})

    def fresh(self, unreported: dict[str, dict[str, str] | None] | None = None) -> RunRecord:
        """A new record of this run: phase new, nothing published. The flow runs still unreported
        (``unreported``, default those of ``record``) are kept: they are this volume's, not the run's."""
        if unreported is None:
            unreported = dict(self.record.unreported)
        return RunRecord(eventId=self.event_id, name=self.name, unreported=unreported)

    def refresh(self) -> RunRecord:
        """Reload ``record`` from the volume: this run's record if the file names this run, else a
        fresh one (no file, another run's file, or a file that cannot be read, which is logged)."""
        self.record = self._load()
        return self.record

    def _load(self) -> RunRecord:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self.fresh()
        except OSError as exc:
            raise VolumeError(f"{RECORD_DIR}/{RECORD_FILE}", exc) from exc
        try:
            record = RunRecord.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring the unreadable run record %s/%s: %s", RECORD_DIR, RECORD_FILE,
                        str(exc).splitlines()[0])
            return self.fresh()
        if (record.eventId, record.name) != (self.event_id, self.name):
            return self.fresh(unreported=record.unreported)
        return record

    def save(self, **changes: Any) -> RunRecord:
        """Apply ``changes`` (fields of :class:`RunRecord`) to ``record`` and write it durably."""
        self.record = self.record.model_copy(update=changes)
        self._write(self.record.model_dump_json(indent=2).encode())
        return self.record

    def add_sending(self, ids: Iterable[str]) -> None:
        """Record, durably and before the transfer goes out, that the child events ``ids`` are handed to
        the event bus: if no answer comes (timeout, lost connection, this process killed) they are
        :meth:`settle_sending`'s "may have been delivered"."""
        known = set(self.record.sending)
        added = [i for i in ids if i not in known]
        if added:
            self.save(sending=[*self.record.sending, *added])

    def add_published(self, ids: Iterable[str]) -> None:
        """Record that the event bus accepted the child events ``ids`` (called once per batch)."""
        crashpoints.reached("accepted")
        ids = list(ids)
        known, accepted = set(self.record.published), set(ids)
        added = [i for i in ids if i not in known]
        sending = [i for i in self.record.sending if i not in accepted]
        if added or sending != self.record.sending:
            self.save(published=[*self.record.published, *added], sending=sending)

    def settle_sending(self, maybe_delivered: bool) -> list[str]:
        """Close the sends whose answer never came: with ``maybe_delivered`` (a timeout, a lost connection,
        a predecessor killed mid-send) they join ``uncertain``; without (the bus refused them for good)
        they are forgotten. Returns the ids settled."""
        settled = list(self.record.sending)
        if settled:
            known = set(self.record.uncertain)
            uncertain = [*self.record.uncertain, *(i for i in settled if i not in known)] if maybe_delivered \
                else self.record.uncertain
            self.save(sending=[], uncertain=uncertain)
        return settled

    def flow_started(self, flow_run_id: str) -> None:
        """Record that the API created the flow run ``flow_run_id`` for this process (no final state yet)."""
        self.save(unreported={**self.record.unreported, flow_run_id: None})

    def flow_pending(self, flow_run_id: str, state_type: str, message: str) -> None:
        """Record the final state (type, e.g. ``COMPLETED``, and message) of ``flow_run_id`` that the
        Prefect API has not recorded yet, for whoever reports it (this process or its successor)."""
        self.save(unreported={**self.record.unreported, flow_run_id: {"type": state_type, "message": message}})

    def flow_reported(self, flow_run_id: str) -> None:
        """The Prefect API recorded the final state of ``flow_run_id``: forget it."""
        if flow_run_id in self.record.unreported:
            self.save(unreported={k: v for k, v in self.record.unreported.items() if k != flow_run_id})

    def close(self) -> None:
        """Mark a done run closed (a graceful stop): the next ``/ready`` starts a fresh run. A run
        that is not done stays open, so a restarted sidecar resumes it."""
        if self.record.phase == "done" and not self.record.closed and self.path.exists():
            self.save(closed=True)

    def _write(self, data: bytes) -> None:
        folder = self.path.parent
        try:
            if folder.is_symlink():  # written through, the record would replace a run.json wherever it points
                raise OSError(errno.ELOOP, "is a link; the run record is kept in a folder of the volume, never "
                                           "written through a link (remove the link)", str(folder))
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RECORD_FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            # The rename itself is durable only once the folder's entry is on disk.
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise VolumeError(f"{RECORD_DIR}/{RECORD_FILE}", exc) from exc
