"""The one shape in which every provider translates its library's exceptions into the sidecar's errors.

A provider writes one function ``translate(exc, where) -> BaseException`` that knows its library
(azure-storage-blob, pymongo, azure-servicebus, the local file system) and answers with
:func:`transient` (retried by the task, HTTP 503), :func:`permanent` (not retried, HTTP 502), a more
specific sidecar error, or ``exc`` itself for what is no service error (a programming error surfaces
unchanged). Every call to the service runs inside :func:`translated`, which passes the data-plane
errors already raised (``DataPlaneError``, ``DataPlaneUnavailable``) through untouched and chains the translated error to the original (``raise ... from exc``), so
logs keep the library's traceback while the module sees one line. Messages name the store and the
object (``where``: a blob, a collection, a topic) and the library's first line, never a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sidecar.errors import DataPlaneError, DataPlaneUnavailable

# A provider's translation: (the library's exception, what was being done) -> the error to raise.
Translate = Callable[[Exception, str], BaseException]


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of ``exc``'s message (SDK messages append stack-like detail), or its
    type's name when the message is empty."""
    text = (exc if isinstance(exc, str) else str(exc)).strip()
    if text:
        return text.splitlines()[0]
    return "" if isinstance(exc, str) else type(exc).__name__


def detail(where: str, exc: BaseException) -> str:
    """``"{where}: {ExceptionType}: {first line}"``, the detail every translated error carries."""
    return f"{where}: {type(exc).__name__}: {first_line(exc)}"


def transient(store: str, where: str, exc: BaseException | None = None, text: str | None = None) -> DataPlaneUnavailable:
    """The retried error of ``store`` (e.g. ``"blob store"``): ``text`` if given, else :func:`detail`."""
    return DataPlaneUnavailable(store, text if text is not None else detail(where, exc))  # type: ignore[arg-type]


def permanent(store: str, where: str, exc: BaseException | None = None, text: str | None = None) -> DataPlaneError:
    """The error of ``store`` no retry can fix: ``text`` if given, else :func:`detail`."""
    return DataPlaneError(store, text if text is not None else detail(where, exc))  # type: ignore[arg-type]


@contextmanager
def translated(translate: Translate, where: str) -> Iterator[None]:
    """Run the body, raising ``translate(exc, where)`` for any exception that is not already a
    data-plane error (``DataPlaneError``/``DataPlaneUnavailable``, raised as they are).

    Cancellation and other ``BaseException`` pass through untouched.
    """
    try:
        yield
    except (DataPlaneError, DataPlaneUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - the provider's translate decides
        error = translate(exc, where)
        if error is exc:
            raise
        raise error from exc
