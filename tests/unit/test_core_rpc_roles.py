"""Who may call which agent method (sharedsync.core.rpc_roles), over every method the proto
defines, so that a method added later is covered by the table without a new line here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_agent.proto import agent_pb2 as pb
from sharedsync.core.errors import PermissionDenied
from sharedsync.core.rpc_roles import (
    PACKAGE,
    CallerRole,
    authorize,
    caller_roles,
    roles_allowed,
)

PEER = "agent.sharedsync.internal"
CONTROLLERS = ("sharedsync-operator",)


def methods(service: str) -> list[str]:
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    return [f"/{PACKAGE}.{service}/{m.name}" for m in descriptor.methods]


CONTROL = methods("Agent")
REPLICATION = methods("Replication")


def test_the_package_is_the_protos() -> None:
    assert pb.DESCRIPTOR.package == PACKAGE
    assert len(CONTROL) >= 10
    assert len(REPLICATION) >= 8


@pytest.mark.parametrize("method", CONTROL)
def test_the_control_api_is_for_controllers_only(method: str) -> None:
    assert roles_allowed(method) == frozenset({CallerRole.CONTROLLER})
    authorize(method, {"sharedsync-operator"}, peer_name=PEER, controller_names=CONTROLLERS)
    with pytest.raises(PermissionDenied, match="controller"):
        authorize(method, {PEER, "node-a"}, peer_name=PEER, controller_names=CONTROLLERS)


@pytest.mark.parametrize("method", REPLICATION)
def test_the_replication_protocol_is_for_agents(method: str) -> None:
    authorize(method, {PEER, "node-a"}, peer_name=PEER, controller_names=CONTROLLERS)
    if method.endswith("/Resync"):  # the operator asks a primary to re-read a replica
        authorize(method, {"sharedsync-operator"}, peer_name=PEER, controller_names=CONTROLLERS)
    else:
        with pytest.raises(PermissionDenied, match="peer"):
            authorize(method, {"sharedsync-operator"}, peer_name=PEER,
                      controller_names=CONTROLLERS)


def test_paths_that_are_not_ours_are_left_to_grpc() -> None:
    assert roles_allowed("/grpc.health.v1.Health/Check") is None
    authorize("/grpc.health.v1.Health/Check", set(), peer_name=PEER, controller_names=())
    # a look-alike service of another package is not ours either
    assert roles_allowed("/evil.sharedsync.agent.v1.Agent/RemoveVolume") is None


def test_a_certificate_may_hold_both_roles_and_names_are_matched_exactly() -> None:
    both = caller_roles([PEER, "sharedsync-operator"], peer_name=PEER,
                        controller_names=CONTROLLERS)
    assert both == {CallerRole.PEER, CallerRole.CONTROLLER}
    assert caller_roles(["sharedsync-operator.evil", "xagent.sharedsync.internal"],
                        peer_name=PEER, controller_names=CONTROLLERS) == set()


def test_no_controller_names_lock_the_control_api_and_say_so() -> None:
    with pytest.raises(PermissionDenied, match="no controller names are configured"):
        authorize(CONTROL[0], {PEER}, peer_name=PEER, controller_names=())


@given(names=st.sets(st.text(max_size=30), max_size=4),
       method=st.sampled_from(CONTROL + REPLICATION))
def test_a_call_is_allowed_exactly_when_a_role_it_holds_is_allowed(
        names: set[str], method: str) -> None:
    roles = caller_roles(names, peer_name=PEER, controller_names=CONTROLLERS)
    allowed = roles_allowed(method)
    assert allowed is not None
    try:
        authorize(method, names, peer_name=PEER, controller_names=CONTROLLERS)
        passed = True
    except PermissionDenied:
        passed = False
    assert passed == bool(roles & allowed)
