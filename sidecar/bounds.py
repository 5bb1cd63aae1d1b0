"""The valid range of every numeric setting, declared beside its field and checked at start-up.

Each settings class (``sidecar/config.py``'s, each provider's ``Config``) lists its numeric fields in a
``BOUNDS`` class variable, ``{field: Bounds(...)}``; :func:`check_bounds` refuses a value outside its
range (and any float that is NaN or infinite) with one line naming the flag and the range, and
``sidecar.flags`` prints the range in the flag reference, so the documentation cannot drift from the check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sidecar.errors import SettingsError

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Bounds:
    """The valid values of one numeric setting.

    Attributes:
        low: the smallest value allowed (None: no lower bound).
        high: the largest value allowed (None: no upper bound).
        above: when true, ``low`` itself is excluded (``> low``: a timeout of 0 is none).
        at_least: the name of a field of the same settings that this one may not be smaller than
            (``inflightbytes`` holds at least one ``chunkbytes`` block).
        unit: shown after the numbers (``bytes``, ``s``).
    """

    low: float | None = None
    high: float | None = None
    above: bool = False
    at_least: str = ""
    unit: str = ""

    def describe(self) -> str:
        """The range as text: ``1..65535``, ``> 0 s``, ``65536..4194304000 bytes``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.low is not None and self.high is not None and not self.above:
            text = f"{_number(self.low)}..{_number(self.high)}"
        else:
            parts = []
            if self.low is not None:
                parts.append(f"{'>' if self.above else '>='} {_number(self.low)}")
            if self.high is not None:
                parts.append(f"<= {_number(self.high)}")
            text = " and ".join(parts) or "any finite number"
        return text + unit + (f", and >= {self.at_least}" if self.at_least else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_bounds(settings: Any, prefix: str) -> None:
    """Check every field ``type(settings).BOUNDS`` names.

    Args:
        settings: a settings dataclass instance with a ``BOUNDS`` class variable.
        prefix: its flag prefix (``"azureblobprovider."``, ``"transfer."``, ``""``).

    Raises:
        SettingsError: ``--{prefix}{field}={value} is out of range (valid: ...)``, the first offender.
    """
    for name, bounds in type(settings).BOUNDS.items():
        value = getattr(settings, name)
        floor = getattr(settings, bounds.at_least) if bounds.at_least else None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (bounds.low is None or (value > bounds.low if bounds.above else value >= bounds.low))
        ok = ok and (bounds.high is None or value <= bounds.high) and (floor is None or value >= floor)
        if not ok:
            at_least = f" (--{prefix}{bounds.at_least}={floor})" if floor is not None else ""
            raise SettingsError(f"--{prefix}{name}={value} is out of range (valid: {bounds.describe()}{at_least})")
