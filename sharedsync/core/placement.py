"""Where a volume's replicas live: the operator's placement decision, as a pure function.

The operator calls :func:`place` on every reconcile with what it sees (nodes, their agents'
Leases, the replicas the volume has) and applies the difference. Moving a replica means copying
the whole volume over the network, so the rules lean hard towards leaving data where it is; and
because the answer is recomputed from scratch each time, it must be a fixed point: asking again
with ``current`` set to the answer changes nothing (except to finish a swap, below).

Rules:

* **Keeping.** A current replica survives while its node is still in ``nodes`` and either its
  agent is alive or the node is in ``keep``. The caller puts in ``keep`` the replicas that are
  down but not yet past ``staleReplicaTimeout``: they may come back with their data, so they
  are not replaced yet. Replicas in ``protect`` (the caller protects the primary) always
  survive and are never removed. A surviving replica counts towards ``desired`` even if its node
  is cordoned, not Ready or short of space: it already holds the data.
* **New replicas** go only to *eligible* nodes (:func:`eligible`): Ready, schedulable, agent
  alive, matching ``nodeSelector``, carrying the topology label, with ``available_bytes >=
  size_bytes``, and not already in ``current``; for a volume that ships btrfs snapshots
  (``snapshots_only``), also keeping replicas on btrfs (an ext4 node cannot receive them).
* **Spread.** Every replica sits in a distinct value ("domain") of ``policy.topology_key``. For
  ``kubernetes.io/hostname`` a node without the label is its own domain (its name); for any
  other key a node without the label has no domain and is not eligible. When the domains run out
  the answer is a shortfall with a reason: a new replica never goes into a used domain (the one
  exception, a swap into its victim's own domain, lasts until the victim is removed).
* **Preference** among eligible nodes: the consumer node first when ``policy.data_locality``;
  then the most ``available_bytes``; then the name. Only unused domains are candidates at all.
* **Misplaced** replicas (on a node that no longer matches ``nodeSelector``, lost the topology
  label, or shares its domain with a better replica, e.g. after ``topologyKey`` changed) are
  kept as long as no eligible replacement exists: the volume never drops below the replicas it
  has in order to chase a label. They are swapped one at a time: the replacement is added first
  (the answer then holds ``desired + 1`` nodes), and the misplaced replica goes on a later call,
  once the replacement is in ``current``, by the ordinary excess rule. A replacement may take
  the misplaced replica's own domain, unless another misplaced replica already shares a domain
  with a well-placed one (the excess rule could then remove the wrong one and leave the domain
  doubled for good). No swap starts while the volume is short of replicas or while any kept
  replica's agent is down (don't reshuffle during a failure), and protected replicas are never
  swapped (they cannot be removed; the caller moves the primary first).
* **Excess** (``desired`` lowered, or a swap finishing): remove agents that are down first,
  then misplaced replicas (first those sharing a domain with a well-placed replica, so that a
  swap into the misplaced replica's own domain removes that very replica), then, when
  ``dataLocality`` is on, replicas away from the consumer, then the least ``available_bytes``,
  then by name.
* **Deterministic.** The answer does not depend on the order of ``nodes``, ``current``,
  ``keep`` or ``protect``; every tuple in it is sorted by name.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidArgument
from .policy import HOSTNAME_KEY, Policy

#: ``NodeView.store_filesystem`` of a node whose replicas can receive btrfs snapshot streams.
BTRFS = "btrfs"


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement needs to know about one Kubernetes node."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key; build with NodeView.of
    ready: bool = True  # the Node's Ready condition
    schedulable: bool = True  # not cordoned
    agent_alive: bool = True  # the node's agent Lease is current
    available_bytes: int = 0  # free space the agent reported
    #: What the agent makes new replicas with: "btrfs", or "ext4" (the fallback store).
    store_filesystem: str = BTRFS

    @classmethod
    def of(cls, name: str, labels: Mapping[str, str] | None = None, *, ready: bool = True,
           schedulable: bool = True, agent_alive: bool = True,
           available_bytes: int = 0, store_filesystem: str = BTRFS) -> NodeView:
        return cls(name=name, labels=tuple(sorted((labels or {}).items())), ready=ready,
                   schedulable=schedulable, agent_alive=agent_alive,
                   available_bytes=available_bytes, store_filesystem=store_filesystem)

    def label(self, key: str) -> str | None:
        for have, value in self.labels:
            if have == key:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Placement:
    """The desired replica set and how it differs from the current one."""

    nodes: tuple[str, ...]  # sorted
    added: tuple[str, ...] = ()  # in nodes, not in current
    removed: tuple[str, ...] = ()  # in current, not in nodes
    shortfall: int = 0  # replicas that could not be placed (0 when satisfied)
    reason: str = ""  # why there is a shortfall; "" when there is none
    #: Replicas in ``nodes`` that break the policy's placement rules (kept for want of a
    #: replacement, being swapped, or protected): worth a Degraded message, not a shortfall.
    misplaced: tuple[str, ...] = ()

    @property
    def satisfied(self) -> bool:
        return self.shortfall == 0


def domain_of(node: NodeView, topology_key: str) -> str | None:
    """The node's topology domain, or None when it has none (and so takes no new replica)."""
    value = node.label(topology_key)
    if value is None and topology_key == HOSTNAME_KEY:
        return node.name
    return value


def human_bytes(count: int) -> str:
    """``1073741824`` -> ``1 GiB``; for messages only."""
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40),
                        ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            if count % scale == 0:
                return f"{count // scale} {unit}"
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def format_selector(selector: Sequence[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{key}: {value}" for key, value in selector) + "}"


class _Why(enum.Enum):
    """Why a node takes no new replica; the order is the order of the summary in reasons."""

    HOLDS = ("already holds one", "already hold one")
    NOT_READY = ("is not Ready", "are not Ready")
    CORDONED = ("is cordoned", "are cordoned")
    AGENT_DOWN = ("has no live agent", "have no live agent")
    SELECTOR = ("does not match nodeSelector {selector}", "do not match nodeSelector {selector}")
    NO_DOMAIN = ("has no {key} label", "have no {key} label")
    SPACE = ("has less than {size} free", "have less than {size} free")
    STORE = ("keeps replicas on ext4 (this volume ships btrfs snapshots)",
             "keep replicas on ext4 (this volume ships btrfs snapshots)")
    DOMAIN_USED = ("shares its {key} with a replica", "share their {key} with a replica")


def _why_not(node: NodeView, policy: Policy, size_bytes: int,
             snapshots_only: bool = False) -> tuple[_Why, str] | None:
    if not node.ready:
        return _Why.NOT_READY, "node is not Ready"
    if not node.schedulable:
        return _Why.CORDONED, "node is cordoned (unschedulable)"
    if not node.agent_alive:
        return _Why.AGENT_DOWN, "the node's sharedsync agent is not alive"
    for key, wanted in policy.node_selector:
        have = node.label(key)
        if have != wanted:
            found = f"label {key} is {have!r}" if have is not None else f"no label {key}"
            return (_Why.SELECTOR, f"does not match nodeSelector "
                                   f"{format_selector(policy.node_selector)} ({found})")
    if domain_of(node, policy.topology_key) is None:
        return _Why.NO_DOMAIN, (f"has no {policy.topology_key} label (the policy's "
                                f"topologyKey)")
    if node.available_bytes < size_bytes:
        return _Why.SPACE, (f"has {human_bytes(max(node.available_bytes, 0))} free, needs "
                            f"{human_bytes(size_bytes)}")
    if snapshots_only and node.store_filesystem != BTRFS:
        return _Why.STORE, (f"keeps replicas on {node.store_filesystem}, and this volume ships "
                            "btrfs snapshots (only a volume first placed on a node without "
                            "btrfs replicates file by file)")
    return None


def eligible(node: NodeView, policy: Policy, size_bytes: int,
             snapshots_only: bool = False) -> str:
    """"" when ``node`` may take a new replica of a volume of ``size_bytes``, else why not.

    Whether the node already holds a replica, or its domain is taken, depends on the other
    replicas and is :func:`place`'s business.
    """
    why = _why_not(node, policy, size_bytes, snapshots_only)
    return "" if why is None else why[1]


def _fits(node: NodeView, policy: Policy) -> bool:
    """Whether an existing replica on ``node`` satisfies the policy's labels."""
    return (all(node.label(key) == value for key, value in policy.node_selector)
            and domain_of(node, policy.topology_key) is not None)


def _check_inputs(desired: int, size_bytes: int, nodes: Sequence[NodeView],
                  current: Sequence[str]) -> None:
    if isinstance(desired, bool) or not isinstance(desired, int) or desired < 0:
        raise InvalidArgument(f"desired replicas must be a whole number >= 0, got {desired!r}")
    if size_bytes < 0:
        raise InvalidArgument(f"volume size must not be negative, got {size_bytes}")
    for what, names in (("nodes", [node.name for node in nodes]), ("current", list(current))):
        twice = sorted(name for name, n in Counter(names).items() if n > 1)
        if twice:
            raise InvalidArgument(f"{what} lists {twice[0]!r} more than once")
        if "" in names:
            raise InvalidArgument(f"{what} holds an empty node name")


def place(policy: Policy, desired: int, size_bytes: int, nodes: Sequence[NodeView],
          current: Sequence[str], *, keep: Collection[str] = (), consumer: str | None = None,
          protect: Collection[str] = (), prefer: str | None = None,
          snapshots_only: bool = False) -> Placement:
    """The replica set for a volume of ``size_bytes`` that should have ``desired`` replicas.

    See the module docstring for the rules. Raises :class:`InvalidArgument` for inputs that
    cannot be meant (duplicate names, more protected replicas than ``desired``).
    ``prefer`` is a node to add before any other eligible one whatever the policy says (the
    node holding a new volume's content source, which must become its primary).
    ``snapshots_only``: the volume ships btrfs snapshots, so new replicas go to btrfs nodes
    only (replicas it has are kept wherever they are).
    """
    _check_inputs(desired, size_bytes, nodes, current)
    by_name = {node.name: node for node in nodes}
    current_set = set(current)
    protected = set(protect) & current_set
    if len(protected) > desired:
        raise InvalidArgument(f"cannot keep {len(protected)} protected replicas "
                              f"({', '.join(sorted(protected))}) with {desired} desired")
    keep_set = set(keep)
    local = consumer if policy.data_locality else None

    def domain(name: str) -> str | None:
        node = by_name.get(name)
        return None if node is None else domain_of(node, policy.topology_key)

    def alive(name: str) -> bool:
        node = by_name.get(name)
        return node is not None and node.agent_alive

    survivors = {name for name in current_set
                 if name in protected or (name in by_name and (alive(name) or name in keep_set))}
    misplaced = _misplaced(survivors, by_name, policy, protected)

    # A misplaced replica sharing its domain with a well-placed one (a finished swap into its
    # own domain, or a topology change) is the first misplaced one to go.
    doubled = _doubled(survivors, misplaced, domain)

    def removal_order(name: str) -> tuple[bool, bool, bool, bool, int, str]:
        node = by_name.get(name)
        return (alive(name), name not in misplaced, name not in doubled, name == local,
                node.available_bytes if node is not None else 0, name)

    kept = set(survivors)
    excess = len(kept) - desired
    if excess > 0:
        kept -= set(sorted(kept - protected, key=removal_order)[:excess])

    used: Counter[str | None] = Counter(d for d in map(domain, kept) if d is not None)
    candidates = sorted(
        (node for node in nodes
         if node.name not in current_set
         and _why_not(node, policy, size_bytes, snapshots_only) is None),
        key=lambda node: (node.name != prefer, node.name != local, -node.available_bytes,
                          node.name))
    added: list[str] = []

    def take(node: NodeView) -> None:
        added.append(node.name)
        used[domain_of(node, policy.topology_key)] += 1

    for node in candidates:
        if len(kept) + len(added) >= desired:
            break
        if used[domain_of(node, policy.topology_key)] == 0:
            take(node)

    short = len(kept) + len(added) < desired
    if not short and all(alive(name) for name in kept if name in by_name):
        # A replacement in the victim's own domain doubles that domain until the victim goes,
        # which the excess rule guarantees only if no other misplaced replica doubles one.
        own_domain_ok = not _doubled(kept, misplaced, domain)
        for victim in sorted((kept & misplaced) - protected, key=removal_order):
            own = domain(victim) if own_domain_ok else None
            replacement = next(
                (node for node in candidates if node.name not in added
                 and (used[d := domain_of(node, policy.topology_key)] == 0
                      or (d == own and used[d] == 1))), None)
            if replacement is not None:
                take(replacement)
                break

    final = kept | set(added)
    shortfall = max(0, desired - len(final))
    return Placement(
        nodes=tuple(sorted(final)),
        added=tuple(sorted(added)),
        removed=tuple(sorted(current_set - final)),
        shortfall=shortfall,
        reason=_reason(policy, desired, size_bytes, nodes, final, snapshots_only)
        if shortfall else "",
        misplaced=tuple(sorted(final & misplaced)),
    )


def _doubled(replicas: set[str], misplaced: set[str],
             domain: Callable[[str], str | None]) -> set[str]:
    """The misplaced ``replicas`` that share a domain with a well-placed one."""
    placed = {d for name in replicas - misplaced if (d := domain(name)) is not None}
    return {name for name in replicas & misplaced if domain(name) in placed}


def _misplaced(survivors: set[str], by_name: Mapping[str, NodeView], policy: Policy,
               protected: set[str]) -> set[str]:
    """Survivors that break the placement rules: wrong labels, or second in their domain.

    Of several fitting replicas in one domain, the one kept as "placed" is the protected one,
    then a live one, then the one with the most space, then by name, so that the excess rule
    (which removes misplaced replicas before placed ones) never removes the better one.
    """
    bad = set()
    by_domain: dict[str, list[NodeView]] = {}
    for name in survivors:
        node = by_name.get(name)
        if node is None:
            continue  # a protected replica whose node is gone: nothing to judge it by
        if not _fits(node, policy):
            bad.add(name)
            continue
        domain = domain_of(node, policy.topology_key)
        assert domain is not None  # _fits checked it
        by_domain.setdefault(domain, []).append(node)
    for group in by_domain.values():
        group.sort(key=lambda node: (node.name not in protected, not node.agent_alive,
                                     -node.available_bytes, node.name))
        bad.update(node.name for node in group[1:])
    return bad


def _reason(policy: Policy, desired: int, size_bytes: int, nodes: Sequence[NodeView],
            final: set[str], snapshots_only: bool) -> str:
    """Why only ``len(final)`` of ``desired`` replicas could be placed, node by node."""
    counts: Counter[_Why] = Counter()
    for node in nodes:
        if node.name in final:
            counts[_Why.HOLDS] += 1
            continue
        why = _why_not(node, policy, size_bytes, snapshots_only)
        # An eligible node left out while replicas are missing can only be in a used domain.
        counts[_Why.DOMAIN_USED if why is None else why[0]] += 1
    values = {"selector": format_selector(policy.node_selector), "key": policy.topology_key,
              "size": human_bytes(size_bytes)}
    parts = [f"{counts[why]} {why.value[0 if counts[why] == 1 else 1].format(**values)}"
             for why in _Why if counts[why]]
    who = f"policy {policy.name}" if policy.name else "the policy"
    plural = "replica" if desired == 1 else "replicas"
    detail = f"of {len(nodes)} nodes, {', '.join(parts)}" if nodes else "there are no nodes"
    return (f"{who} wants {desired} {plural}, one per {policy.topology_key}, but only "
            f"{len(final)} can be placed: {detail}")
