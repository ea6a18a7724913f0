"""Who may call which agent method over the network: one table, checked on every call.

An agent's network port serves two gRPC services to two kinds of caller, told apart by the
names their (CA-verified) client certificates carry:

- ``Replication`` is the agents' own protocol (pushes, holdings, the fsync journal, file-level
  pulls). Only agents call it: a certificate that carries the agents' shared name. The
  operator calls one of its methods, ``Resync`` (re-read what a replica holds after it was
  recreated empty), which makes a primary send more, never less.
- ``Agent`` is the control API: apply, remove, promote, attach, snapshot, status. Only a
  controller calls it over the network: the operator and the CSI controller, whose client
  certificate carries one of the agent's ``controllerNames``.

So a node whose agent certificate is stolen can no longer remove or promote replicas on other
nodes, or read their status; it can still speak the replication protocol, whose receivers
confine what a peer can do (streams received chrooted, paths kept inside the replica, epochs
checked). The node-local control socket (the CSI node plugin, the CLI) is not subject to this
table: it is reachable only from the node itself.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable

from .errors import PermissionDenied

#: gRPC method paths are ``/<package>.<Service>/<Method>``.
PACKAGE = "sharedsync.agent.v1"
AGENT_SERVICE = f"/{PACKAGE}.Agent/"
REPLICATION_SERVICE = f"/{PACKAGE}.Replication/"
#: The one replication method a controller calls as well (the operator, after it recreated a
#: replica).
SHARED_METHODS = frozenset({f"{REPLICATION_SERVICE}Resync"})


class CallerRole(enum.StrEnum):
    PEER = "peer"  # another agent
    CONTROLLER = "controller"  # the operator, the CSI controller


def roles_allowed(method: str) -> frozenset[CallerRole] | None:
    """The roles that may call ``method``; None for a path that is none of ours (gRPC itself
    answers UNIMPLEMENTED for it)."""
    if method in SHARED_METHODS:
        return frozenset({CallerRole.PEER, CallerRole.CONTROLLER})
    if method.startswith(REPLICATION_SERVICE):
        return frozenset({CallerRole.PEER})
    if method.startswith(AGENT_SERVICE):
        return frozenset({CallerRole.CONTROLLER})
    return None


def caller_roles(names: Iterable[str], *, peer_name: str,
                 controller_names: Collection[str]) -> frozenset[CallerRole]:
    """The roles a verified certificate carrying ``names`` (its common name and DNS names)
    holds: an agent's shared name makes a peer, a controller name a controller."""
    held = set(names)
    roles = set()
    if peer_name in held:
        roles.add(CallerRole.PEER)
    if held & set(controller_names):
        roles.add(CallerRole.CONTROLLER)
    return frozenset(roles)


def authorize(method: str, names: Collection[str], *, peer_name: str,
              controller_names: Collection[str]) -> None:
    """Raise ``PermissionDenied`` unless a caller whose certificate carries ``names`` may call
    ``method``. The message names the method and who may call it, never the certificate."""
    allowed = roles_allowed(method)
    if allowed is None:
        return
    if caller_roles(names, peer_name=peer_name, controller_names=controller_names) & allowed:
        return
    who = " or ".join(sorted(f"a {role}" for role in allowed))
    raise PermissionDenied(f"{method} may be called only by {who} (a certificate naming "
                           f"{_names_for(allowed, peer_name, controller_names)})")


def _names_for(allowed: frozenset[CallerRole], peer_name: str,
               controller_names: Collection[str]) -> str:
    names = ([peer_name] if CallerRole.PEER in allowed else []) + \
        (sorted(controller_names) if CallerRole.CONTROLLER in allowed else [])
    return ", ".join(names) if names else "nothing: no controller names are configured"
