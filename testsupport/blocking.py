"""A synchronous face of an asynchronous provider, for tests and benchmarks that are not coroutines."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


class Blocking:
    """Wraps a provider (a document store, an event publisher): each coroutine method call runs to
    completion on this wrapper's own event loop (one loop per wrapper, so the provider's connections
    stay on the loop that opened them); other attributes pass through. ``close()`` closes the
    provider, then the loop; usable as a context manager."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self.loop.run_until_complete(attribute(*args, **kwargs))

    def call(self, function: Any) -> Any:
        """Run the plain function ``function()`` inside the loop (for code that needs a running loop)."""
        async def run() -> Any:
            return function()

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.inner.close())
        finally:
            self.loop.close()

    def __enter__(self) -> "Blocking":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
