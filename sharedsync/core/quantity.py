"""Kubernetes-style byte quantities, as users write them in SyncPolicies.

``bandwidth: 20Mi`` means 20 MiB/s: the same spellings ``kubectl`` accepts, parsed exactly (no
float rounding). Durations (``maxLag: 1m30s``) are :func:`sharedsync.core.schedule.parse_duration`.
"""

import re
from decimal import Decimal

from .errors import InvalidArgument

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
           "Ei": 1 << 60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


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
