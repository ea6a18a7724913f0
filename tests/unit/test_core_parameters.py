"""sharedsync.core.parameters: StorageClass parameters are validated before anything happens."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.parameters import (
    KNOWN_KEYS,
    MAX_MAP_BYTES,
    RESERVED_PREFIX,
    SYNC_POLICY,
    VolumeParameters,
    check_map,
    map_bytes,
    parse_parameters,
)


def test_empty_parameters_mean_defaults() -> None:
    params = parse_parameters({})
    assert params == VolumeParameters()
    assert params.sync_policy == ""
    assert params.to_context() == {}


@pytest.mark.parametrize(
    "policy", ["fast", "a", "0", "sync-3", "team.sync-policy.v1", "a" * 253,
               ".".join(["a" * 63] * 4)[:253].rstrip(".")],
)
def test_good_sync_policy(policy: str) -> None:
    params = parse_parameters({SYNC_POLICY: policy})
    assert params.sync_policy == policy
    assert params.to_context() == {SYNC_POLICY: policy}


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param("Fast", id="uppercase"),
        pytest.param("-fast", id="leading-dash"),
        pytest.param("fast-", id="trailing-dash"),
        pytest.param(".fast", id="leading-dot"),
        pytest.param("fast.", id="trailing-dot"),
        pytest.param("a..b", id="empty-label"),
        pytest.param("fast_sync", id="underscore"),
        pytest.param("fast sync", id="space"),
        pytest.param("fast\n", id="trailing-newline"),
        pytest.param("fa/st", id="slash"),
        pytest.param("caf\u00e9", id="non-ascii"),
        pytest.param("a" * 254, id="too-long"),
    ],
)
def test_bad_sync_policy_names_rejected(policy: str) -> None:
    with pytest.raises(InvalidArgument, match=SYNC_POLICY):
        parse_parameters({SYNC_POLICY: policy})


def test_unknown_key_is_named() -> None:
    with pytest.raises(InvalidArgument, match="'replicaCount'") as info:
        parse_parameters({"replicaCount": "3", SYNC_POLICY: "fast"})
    for known in KNOWN_KEYS:
        assert known in str(info.value)


def test_several_unknown_keys_name_the_first_and_count_the_rest() -> None:
    with pytest.raises(InvalidArgument, match=r"'alpha'.*\(and 2 more\)"):
        parse_parameters({"gamma": "1", "alpha": "1", "beta": "1"})


def test_key_case_matters() -> None:
    with pytest.raises(InvalidArgument, match="'syncpolicy'"):
        parse_parameters({"syncpolicy": "fast"})


def test_reserved_keys_ignored() -> None:
    raw = {
        f"{RESERVED_PREFIX}pvc/name": "data",
        f"{RESERVED_PREFIX}pvc/namespace": "default",
        f"{RESERVED_PREFIX}pv/name": "pvc-123",
        f"{RESERVED_PREFIX}provisioner-secret-name": "whatever",
        f"{RESERVED_PREFIX}fstype": "NOT a valid anything",
        SYNC_POLICY: "fast",
    }
    assert parse_parameters(raw) == VolumeParameters(sync_policy="fast")


def test_prefix_lookalikes_are_not_reserved() -> None:
    with pytest.raises(InvalidArgument, match=re.escape("'csi.storage.k8s.io.extra'")):
        parse_parameters({"csi.storage.k8s.io.extra": "x"})
    with pytest.raises(InvalidArgument, match=re.escape("'csi.storage.k8s.io'")):
        parse_parameters({"csi.storage.k8s.io": "x"})


def test_map_bytes_counts_utf8_keys_and_values() -> None:
    assert map_bytes({}) == 0
    assert map_bytes({"ab": "cde"}) == 5
    assert map_bytes({"\u00e9": "\u20ac"}) == 2 + 3


def test_map_at_limit_accepted_and_over_limit_rejected() -> None:
    key = f"{RESERVED_PREFIX}pad"
    at_limit = {key: "x" * (MAX_MAP_BYTES - len(key))}
    assert map_bytes(at_limit) == MAX_MAP_BYTES
    check_map(at_limit, "parameters")
    assert parse_parameters(at_limit) == VolumeParameters()
    over = {key: "x" * (MAX_MAP_BYTES - len(key) + 1)}
    with pytest.raises(InvalidArgument, match="parameters is larger than 4096 bytes"):
        parse_parameters(over)


def test_over_4kib_rejected_even_when_spread_over_many_reserved_keys() -> None:
    raw = {f"{RESERVED_PREFIX}k{i}": "v" * 100 for i in range(50)}
    assert map_bytes(raw) > MAX_MAP_BYTES
    with pytest.raises(InvalidArgument, match="larger than"):
        parse_parameters(raw)


def test_over_4kib_counts_multibyte_characters_as_bytes() -> None:
    raw = {f"{RESERVED_PREFIX}k": "\u20ac" * 1400}  # 1400 characters, 4200 bytes
    with pytest.raises(InvalidArgument, match="larger than"):
        parse_parameters(raw)


_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=5).map(".".join))
def test_any_dns_subdomain_is_a_valid_policy(policy: str) -> None:
    assert parse_parameters({SYNC_POLICY: policy}).sync_policy == policy


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=10))
def test_parse_parameters_never_crashes(raw: dict[str, str]) -> None:
    try:
        params = parse_parameters(raw)
    except InvalidArgument:
        return
    ours = {k for k in raw if not k.startswith(RESERVED_PREFIX)}
    assert ours <= KNOWN_KEYS
    assert params.sync_policy == raw.get(SYNC_POLICY, "")


@given(st.dictionaries(st.text(alphabet="abcxyz/.", min_size=1, max_size=12),
                       st.text(max_size=20), min_size=1, max_size=5))
def test_unknown_keys_always_named(extra: dict[str, str]) -> None:
    unknown = {k: v for k, v in extra.items()
               if k not in KNOWN_KEYS and not k.startswith(RESERVED_PREFIX)}
    if not unknown:
        return
    with pytest.raises(InvalidArgument) as info:
        parse_parameters(unknown)
    assert repr(min(unknown)) in str(info.value)
