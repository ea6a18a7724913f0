"""Pods stranded by a failover: which of them the operator deletes so that they can move.

When a node dies, Kubernetes never replaces a StatefulSet's pod on it by itself: the
StatefulSet controller waits for the pod object to go, and only the dead node's kubelet would
confirm that (the StatefulSet's at-most-one guarantee). A Deployment's pod is replaced once it
is evicted (after five minutes by default), but the old one stays Terminating meanwhile. The
volume is writable on another node long before that (failover takes seconds); the pod is what
keeps the application down. A platform team, or a node-fencing controller, force-deletes the
pod; a SyncPolicy can ask the operator to do it (``spec.failover.strandedPodDeletion``).

A node counts as lost when two independent witnesses agree, continuously for
:data:`LOST_CONFIRM_SECONDS`: its kubelet is not Ready (the node lifecycle controller says so)
and its sharedsync agent's Lease has expired. Both may also hold for a node that is only cut
off, with the pod still running there. For the pod's sharedsync volumes that is safe: a
primary cut off from its Lease and its peers suspends writes, and one fenced by a newer epoch
refuses every commit, so nothing the stranded pod writes is acknowledged. Anything else the pod
does outside its volumes is the platform team's to judge, which is why the default is Never.

The same happens, without force, to pods on a node that is well but stopped serving their
volume under them: a primary cut off long enough to be failed over (its Lease expired while
its node stayed Ready) is fenced, then rejoins as a replica, and the pods that used the volume
there keep a mount that no longer works (EROFS, then ENOTCONN), running, never replaced. Its
agent reports when that happened (``consumers_stranded_unix_ns``); the pods there that mount
the volume, run, and were created before then are the ones that lost it (a pod created since
is one waiting for the volume to come to it).

A pod is deleted only if every sharedsync volume it mounts allows it, for the kind of its
controller: ``StatefulSet`` for a StatefulSet's pods, ``Deployment`` for a ReplicaSet's (a
Deployment's pods are a ReplicaSet's). A pod that mounts no sharedsync volume, has no
controller, or whose volume's policy cannot be read is never deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: Both witnesses must agree this long (the operator's own clock) before a node counts as
#: lost: long enough to ride out one missed Lease renewal seen next to a stale node status.
LOST_CONFIRM_SECONDS: Final = 5.0

#: Which controller kinds (a pod's ``ownerReferences`` entry with ``controller: true``) each
#: ``strandedPodDeletion`` value lets the operator delete pods of.
OWNER_KINDS: Final[Mapping[str, frozenset[str]]] = {
    "Never": frozenset(),
    "StatefulSet": frozenset({"StatefulSet"}),
    "Deployment": frozenset({"ReplicaSet"}),
    "StatefulSetAndDeployment": frozenset({"StatefulSet", "ReplicaSet"}),
}


@dataclass(frozen=True, slots=True)
class NodeSignals:
    """What the operator sees of one node."""

    #: The node's Ready condition is True.
    ready: bool
    #: The node's agent has ever announced itself with a Lease (nodes without our agent never
    #: held a sharedsync volume's replica nor mounted one).
    agent_known: bool
    #: That Lease is current.
    agent_alive: bool

    @property
    def lost(self) -> bool:
        return not self.ready and self.agent_known and not self.agent_alive


def confirm_lost(signals: Mapping[str, NodeSignals], lost_since: Mapping[str, float],
                 now: float, confirm: float = LOST_CONFIRM_SECONDS
                 ) -> tuple[frozenset[str], dict[str, float]]:
    """The nodes lost for at least ``confirm`` seconds, and the new ``lost_since`` (when each
    node now lost was first seen lost; a node seen well again starts over)."""
    since = {node: lost_since.get(node, now) for node, seen in signals.items() if seen.lost}
    return frozenset(n for n, first in since.items() if now - first >= confirm), since


@dataclass(frozen=True, slots=True)
class StrandedPod:
    """A running pod that mounts sharedsync volumes, on a lost node or on a node that stopped
    serving one of them, as far as the decision needs it."""

    namespace: str
    name: str
    node: str
    #: The kind of the pod's controller ("" when it has none).
    owner_kind: str
    #: The sharedsync volumes (SharedVolume names) the pod mounts.
    volumes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    delete: bool
    #: Why (for the log and the pod's event): the policies that allowed it, or what kept it.
    reason: str


def verdict(pod: StrandedPod, settings: Mapping[str, str | None]) -> Verdict:
    """Whether to delete ``pod``; ``settings`` maps each of its volumes to its policy's
    ``strandedPodDeletion`` (None when the volume or its policy cannot be read)."""
    if not pod.volumes:
        return Verdict(False, "it mounts no sharedsync volume")
    if not pod.owner_kind:
        return Verdict(False, "no controller would replace it")
    allowed: list[str] = []
    for volume in sorted(set(pod.volumes)):
        setting = settings.get(volume)
        if setting is None:
            return Verdict(False, f"the policy of volume {volume} cannot be read")
        if pod.owner_kind not in OWNER_KINDS.get(setting, frozenset()):
            return Verdict(False, f"volume {volume}'s policy has strandedPodDeletion "
                                  f"{setting}, which does not cover {pod.owner_kind} pods")
        allowed.append(f"{volume} ({setting})")
    return Verdict(True, f"strandedPodDeletion allows it for every volume it mounts: "
                         f"{', '.join(allowed)}")



def lost_volumes(pod: StrandedPod, running: bool, created_unix_ns: int,
                 stranded_since: Mapping[str, int]) -> tuple[str, ...]:
    """The volumes ``pod`` lost on a node that is well: those it mounts that the node stopped
    serving (``stranded_since``: volume -> Unix ns) after the pod was created, if it runs."""
    if not running:
        return ()
    return tuple(sorted(v for v in set(pod.volumes)
                        if stranded_since.get(v, 0) > created_unix_ns))
