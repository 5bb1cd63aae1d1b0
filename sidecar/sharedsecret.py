"""The shared secret's one rule, the same in the server (``sidecar.api``) and the module client
(``ion_sidecar_client.secret_problem``, a copy in that separate httpx-only distribution; a test keeps
the two equal).

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

HEADER = "secret"


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot be the shared secret (a phrase, never quoting the secret), or None."""
    if not secret:
        return "is empty"
    if secret != secret.strip(" \t"):
        return "starts or ends with a blank, which HTTP strips from header values"
    for ch in secret:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"holds control character U+{code:04X}, which an HTTP header cannot carry"
        if 0xD800 <= code <= 0xDFFF:
            return "is not valid UTF-8"
    return None


def header_value(secret: str) -> bytes:
    """The ``secret`` header's value for ``secret``: its UTF-8 bytes."""
    return secret.encode("utf-8")


def matches(received: str, expected: bytes) -> bool:
    """Whether a received header value (as Starlette gives it: its bytes decoded as Latin-1) is the
    secret whose UTF-8 bytes are ``expected``; compared in constant time."""
    return secrets.compare_digest(received.encode("latin-1"), expected)
