"""Kubernetes-style quantities and durations, as users write them in SyncPolicies.

``bandwidth: 20Mi`` means 20 MiB/s and ``maxLag: 1m30s`` ninety seconds: the same spellings
``kubectl`` accepts, parsed exactly (no float rounding for byte quantities).
"""

import re
from decimal import Decimal, InvalidOperation

from .errors import InvalidArgument

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
           "Ei": 1 << 60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"),
                 "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def parse_bytes(text: str | int) -> int:
    """A byte quantity (``512``, ``20Mi``, ``1.5Gi``, ``10M``) as an integer number of bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"quantity must not be negative, got {text}")
        return text
    match = _QUANTITY.match(text.strip())
    if not match:
        raise InvalidArgument(
            f"{text!r} is not a quantity (examples: 1048576, 20Mi, 1.5Gi, 100M)")
    number, suffix = match.group(1), match.group(2) or ""
    scale = _BINARY.get(suffix) or _DECIMAL[suffix]
    value = Decimal(number) * scale
    if value != value.to_integral_value():
        raise InvalidArgument(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str | float | int) -> float:
    """A duration (``5s``, ``1m30s``, ``500ms``, ``2h``) in seconds; bare numbers are seconds."""
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidArgument(f"duration must not be negative, got {text}")
        return float(text)
    spec = text.strip()
    try:
        return float(Decimal(spec)) if spec and Decimal(spec) >= 0 else _parse_parts(spec)
    except InvalidOperation:
        return _parse_parts(spec)


def _parse_parts(spec: str) -> float:
    pos, total = 0, Decimal(0)
    for match in _DURATION_PART.finditer(spec):
        if match.start() != pos:
            break
        total += Decimal(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not spec or pos != len(spec):
        raise InvalidArgument(f"{spec!r} is not a duration (examples: 5s, 1m30s, 500ms, 2h)")
    return float(total)
