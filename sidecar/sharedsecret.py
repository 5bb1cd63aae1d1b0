"""The shared secret's one rule, in the server (``sidecar.api``) and the module client: one function,
``ion_sidecar_client.secret_problem`` (the httpx-only distribution both install), applied by the client
at construction and by the server at start-up.

HTTP carries a header value as bytes: RFC 9110 (section 5.5) allows visible ASCII, blanks inside, and
"obs-text" bytes 0x80-0xFF, strips blanks (space, tab) at either end, and forbids control characters.
Starlette decodes the bytes it receives as Latin-1 and httpx encodes a ``str`` header as ASCII, so a
secret with ``€`` or ``ä`` matched nothing (or only Latin-1 bytes) before. The rule now:

- the secret travels as its UTF-8 bytes: the client sends ``secret.encode("utf-8")`` and the server
  compares the bytes it received with the UTF-8 bytes of ``--sharedsecret`` (in constant time);
- a secret that HTTP cannot carry unchanged is refused at start-up (server) or construction (client)
  with one line: blanks at either end, control characters (U+0000-U+001F, U+007F-U+009F), or text that
  is not valid UTF-8.
"""

from __future__ import annotations

import secrets

from ion_sidecar_client import secret_problem

__all__ = ["HEADER", "header_value", "matches", "secret_problem"]

HEADER = "secret"


def header_value(secret: str) -> bytes:
    """The ``secret`` header's value for ``secret``: its UTF-8 bytes."""
    return secret.encode("utf-8")


def matches(received: str, expected: bytes) -> bool:
    """Whether a received header value (as Starlette gives it: its bytes decoded as Latin-1) is the
    secret whose UTF-8 bytes are ``expected``; compared in constant time."""
    return secrets.compare_digest(received.encode("latin-1"), expected)
