"""The durable records behind CSI volumes and snapshots.

They are plain values: a state store persists them (on local disk now, as SharedVolume objects
in Kubernetes later) and the CSI controller reasons about them. ``revision`` gives every store
the same optimistic-concurrency contract: a write names the revision it read, and loses if
someone else wrote in between.
"""

import enum
from dataclasses import dataclass, field


class Phase(enum.StrEnum):
    """Where a record is in its lifecycle; only READY objects are reported to the CO."""

    CREATING = "Creating"
    READY = "Ready"
    DELETING = "Deleting"


class SourceKind(enum.StrEnum):
    """What a volume was created from."""

    NONE = ""
    SNAPSHOT = "snapshot"
    VOLUME = "volume"


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """One provisioned volume."""

    volume_id: str
    name: str
    capacity_bytes: int
    kind: str  # "filesystem" or "block"
    access_modes: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = ()
    source_kind: SourceKind = SourceKind.NONE
    source_id: str = ""
    accessible_nodes: tuple[str, ...] = ()
    phase: Phase = Phase.CREATING
    created_at: float = 0.0
    revision: int = 0

    @property
    def parameter_map(self) -> dict[str, str]:
        return dict(self.parameters)


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One snapshot of a volume."""

    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_at_ns: int
    phase: Phase = Phase.CREATING
    accessible_nodes: tuple[str, ...] = field(default=())
    revision: int = 0
