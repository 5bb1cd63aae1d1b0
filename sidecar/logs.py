"""Logging for the sidecar: every line names the module, event, correlation and execution, and no
line carries a secret (``--loglevel``, ``--logfile``)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Iterable

from sidecar.config import LogLevel, SidecarConfig, secret_values
from sidecar.errors import InputError
from sidecar.paths import shown
from sidecar.redaction import REDACTED, mask_fields

FORMAT = (
    "%(asctime)s %(levelname)s %(name)s "
    "[module=%(ion_module)s event=%(ion_event)s correlation=%(ion_correlation)s "
    "execution=%(ion_execution)s] %(ion_run)s%(message)s"
)

LEVELS = {
    LogLevel.debug: logging.DEBUG,
    LogLevel.info: logging.INFO,
    LogLevel.warn: logging.WARNING,
    LogLevel.error: logging.ERROR,
}

# Secrets at least this long are masked wherever their text appears (a log line cannot show one, even
# glued to other text); the sidecar refuses shorter ones at start-up (sidecar/cli.py), because masking
# a short text everywhere garbles ordinary words: with the secret "x", "exception" became "e***ception".
MIN_SECRET_CHARS = 8


# Connection-string fields whose value is a secret, read out of a secret connection string.
_SECRET_FIELDS = {"accountkey", "sharedaccesskey", "sharedaccesssignature", "password", "pwd"}


def secret_forms(secrets: Iterable[str]) -> set[str]:
    """Every text that shows one of ``secrets``: the value itself, percent-encoded (``quote``,
    ``quote_plus``) and decoded, and for a connection string or a URI the secret fields inside it
    (``AccountKey``, ``SharedAccessKey``, ``SharedAccessSignature``, a URI's password), each in the
    same forms."""
    from urllib.parse import quote, quote_plus, unquote, urlsplit

    parts: set[str] = set()
    for secret in (s for s in secrets if s):
        parts.add(secret)
        for field in secret.split(";"):
            name, sep, value = field.partition("=")
            if sep and name.strip().lower() in _SECRET_FIELDS and value:
                parts.add(value)
        if "://" in secret:
            try:
                password = urlsplit(secret).password
            except ValueError:
                password = None
            if password:
                parts.add(password)
    forms: set[str] = set()
    for part in parts:
        forms |= {part, quote(part, safe=""), quote_plus(part, safe=""), unquote(part)}
    return {f for f in forms if f}


class ContextFilter(logging.Filter):
    """Adds the run's context to each record and replaces secret values with ``***``.

    Args:
        context: ``{"ion_module", "ion_event", "ion_correlation", "ion_execution"}`` strings.
        secrets: values that must never be written (shared secret, account keys, passwords, ...).

    Masking rule: every form of a secret (:func:`secret_forms`) of :data:`MIN_SECRET_CHARS` or more
    characters is replaced wherever it appears; a shorter one (the sidecar refuses those at start-up, so
    only a caller that bypasses its checks passes one) only where it stands as a whole word, not inside
    a longer run of letters and digits, so ordinary words stay readable. Whatever the secrets, the value
    of every ``AccountKey=``, ``SharedAccessKey=``, ``sig=`` and ``password=`` field and the password of
    a URI's user information are masked too (a key the sidecar was never given, an SDK's own string).
    """

    def __init__(self, context: dict[str, str], secrets: Iterable[str]):
        super().__init__()
        self.context = context
        self.secrets = sorted(secret_forms(secrets), key=len, reverse=True)
        patterns = [re.escape(s) if len(s) >= MIN_SECRET_CHARS else rf"(?<![^\W_]){re.escape(s)}(?![^\W_])"
                    for s in self.secrets]
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.context.items():
            setattr(record, key, value)
        # Even with no secret given: the secret fields of any connection string are masked.
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean, exc_text = self.redact(message), self.redact(record.exc_text or "")
        if clean != message or exc_text != (record.exc_text or ""):
            record.msg, record.args = clean, None
            record.exc_text = exc_text or None
        return True

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***`` (the class's masking rule)."""
        if self._pattern:
            text = self._pattern.sub(REDACTED, text)
        return mask_fields(text)


class RunFormatter(logging.Formatter):
    """:data:`FORMAT`, where a line from a Prefect flow or task run names the run before its message
    as Prefect's own console lines do (``Task run 'upload-2-files' - Finished in state Completed()``);
    Prefect's run loggers put the names in the record (``task_run_name``, ``flow_run_name``)."""

    def format(self, record: logging.LogRecord) -> str:
        task_run, flow_run = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.ion_run = (f"Task run '{task_run}' - " if task_run else
                          f"Flow run '{flow_run}' - " if flow_run and flow_run != "<unknown>" else "")
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        # Every line of the message readable, whatever it quotes (sidecar.paths.shown: a bidi override
        # or a control character in a name cannot reorder or forge a log line); a message of several
        # lines (a traceback Prefect logs as text) keeps its line breaks.
        record.message = "\n".join(shown(line) for line in record.message.split("\n"))
        return super().formatMessage(record)


class BadInputFilter(logging.Filter):
    """On Prefect's run loggers: a module's bad input (:class:`~sidecar.errors.InputError`, HTTP 4xx) is
    one WARNING line naming the file and key, without a traceback, on stderr and in the Prefect UI.

    Prefect logs a failing run's exception at ERROR with its traceback (once per task run and again
    for the flow run) and then "Finished in state Failed(...)" at ERROR. For a bad input the first of
    those records becomes the WARNING line, the repeats are dropped, and the runs' "Finished in state"
    lines are logged at INFO, like every other state line. A logger's filters run before its handlers
    (Prefect's API handler included) and before the record propagates to the root's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.runs: set[str] = set()  # ids of flow and task runs that failed on a bad input

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        runs = {str(getattr(record, name)) for name in ("flow_run_id", "task_run_id") if getattr(record, name, None)}
        if isinstance(exc, InputError):
            if runs & self.runs:
                self.runs |= runs
                return False
            self.runs |= runs
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = f"bad input, nothing committed: {exc.message}", None
            record.exc_info, record.exc_text = None, None
        elif runs & self.runs and record.levelno > logging.INFO and record.getMessage().startswith("Finished in state"):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def configure_logging(cfg: SidecarConfig) -> ContextFilter:
    """Send the sidecar's, uvicorn's and Prefect's log records to stderr (and ``cfg.logfile``)
    through one :class:`ContextFilter`; returns that filter."""
    ctx = cfg.context
    context_filter = ContextFilter(
        {
            "ion_module": ctx.name,
            "ion_event": str(ctx.eventid),
            "ion_correlation": str(ctx.correlationid),
            "ion_execution": ctx.execution_id(),
        },
        secret_values(cfg),
    )
    formatter = RunFormatter(FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.logfile:
        handlers.append(logging.FileHandler(cfg.logfile, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(context_filter)
        root.addHandler(handler)
    level = LEVELS[LogLevel(cfg.loglevel)]
    root.setLevel(level)
    # Prefect and uvicorn configure their own handlers; route them through ours instead. Prefect's
    # API handlers stay (they feed the run history), with the filter: a record reaches the handlers of
    # its own logger (prefect.flow_runs, prefect.task_runs, ...) before it propagates to ours.
    for name in ("prefect", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx"):
        _route(logging.getLogger(name), context_filter)
        logging.getLogger(name).propagate = True
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("prefect.") and isinstance(logger, logging.Logger):
            _route(logger, context_filter)
    bad_input = BadInputFilter()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(bad_input)
    # httpx and the Azure SDKs log every HTTP request at INFO; at thousands of blobs per call that
    # costs measurable time and buries the sidecar's own lines.
    for name in ("httpx", "azure"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return context_filter


def _route(logger: logging.Logger, context_filter: ContextFilter) -> None:
    """Filter ``logger``'s Prefect API handlers; replace its other handlers by propagation to ours."""
    for handler in list(logger.handlers):
        if any(cls.__name__ == "APILogHandler" for cls in type(handler).__mro__):
            handler.addFilter(context_filter)
        else:
            logger.removeHandler(handler)
            logger.propagate = True
