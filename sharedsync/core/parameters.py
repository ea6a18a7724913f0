"""StorageClass parameters: the few keys we accept, validated before anything happens.

Kubernetes passes a StorageClass's ``parameters`` to CreateVolume verbatim, plus keys under
``csi.storage.k8s.io/`` that the external-provisioner adds or consumes (secrets, PVC metadata).
Those are not ours and are ignored; any other key we do not know is refused with
INVALID_ARGUMENT naming it, so a typo fails at provisioning time instead of silently doing the
default.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidArgument

RESERVED_PREFIX = "csi.storage.k8s.io/"
SYNC_POLICY = "syncPolicy"
KNOWN_KEYS = frozenset({SYNC_POLICY})
#: CSI caps a map at 4 KiB in total.
MAX_MAP_BYTES = 4096

# Always used with fullmatch: ``$`` alone would also accept a trailing newline.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True, slots=True)
class VolumeParameters:
    """What a StorageClass asked of a volume, after validation."""

    sync_policy: str = ""

    def to_context(self) -> dict[str, str]:
        """The volume_context echoed back to the CO (and on to NodeStage/NodePublish)."""
        return {SYNC_POLICY: self.sync_policy} if self.sync_policy else {}


def map_bytes(values: Mapping[str, str]) -> int:
    """Size of a string map the way the CSI spec counts it (keys plus values, UTF-8)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in values.items())


def check_map(values: Mapping[str, str], field: str) -> None:
    """Refuse a map over the spec's 4 KiB bound."""
    if map_bytes(values) > MAX_MAP_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_MAP_BYTES} bytes")


def parse_parameters(raw: Mapping[str, str]) -> VolumeParameters:
    """Validate StorageClass parameters; unknown keys are an error that names them."""
    check_map(raw, "parameters")
    ours = {k: v for k, v in raw.items() if not k.startswith(RESERVED_PREFIX)}
    unknown = sorted(set(ours) - KNOWN_KEYS)
    if unknown:
        raise InvalidArgument(
            f"invalid parameter {unknown[0]!r} in storage class"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known parameters: {', '.join(sorted(KNOWN_KEYS))}"
        )
    policy = ours.get(SYNC_POLICY, "")
    if policy and (len(policy) > 253 or not _DNS_SUBDOMAIN.fullmatch(policy)):
        raise InvalidArgument(
            f"parameter {SYNC_POLICY!r} must be the name of a SyncPolicy "
            f"(a DNS subdomain), got {policy[:64]!r}"
        )
    return VolumeParameters(sync_policy=policy)
