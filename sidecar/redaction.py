"""Masking the secret fields of connection strings, SAS tokens and URIs in any text (one place, used by
every error message, ``sidecar.errors.SidecarError``, and every log line, ``sidecar.logs``)."""

from __future__ import annotations

import re

REDACTED = "***"

# The secret fields of the providers' connection strings, SAS tokens and URIs, masked wherever they
# appear, whatever string they came from (a connection string in another order, a SAS URL an SDK built,
# a URI percent-encoded): AccountKey= (Azure Storage), SharedAccessKey= (Service Bus), the sig= of a SAS
# token (Storage SAS query strings, Service Bus "SharedAccessSignature sr=..&sig=..") and password=;
# the "=" may be percent-encoded (%3D) and the value runs to the next separator.
_FIELD = re.compile(r"(?i)(?<![A-Za-z0-9])((?:AccountKey|SharedAccessKey|sig|password|pwd)\s*(?:=|%3D)\s*)"
                    r"((?:[^;&\s\"'<>,%]|%(?!26|3B|22|27|20)[0-9A-Fa-f]{2})+)")
# The password of a URI's user information (mongodb://user:password@host), plain or percent-encoded.
_USERINFO = re.compile(r"(?i)((?:://|%3A%2F%2F)[^\s/@:%]*(?::|%3A))((?:[^\s/@%]|%(?!40)[0-9A-Fa-f]{2})+)(?=@|%40)")


def mask_fields(text: str) -> str:
    """``text`` with the value of every ``AccountKey=``, ``SharedAccessKey=``, ``sig=``, ``password=`` and
    ``pwd=`` field and the password of every URI's user information replaced by ``***``, plain or
    percent-encoded (the secrets the sidecar holds are masked by ``sidecar.logs.ContextFilter`` too)."""
    return _USERINFO.sub(rf"\1{REDACTED}", _FIELD.sub(rf"\1{REDACTED}", text))
