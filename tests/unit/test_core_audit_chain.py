"""sharedsync.core.audit_chain: canonical records, hash chaining, verification, redaction."""

from __future__ import annotations

import dataclasses
import json

import blake3
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sharedsync.core.audit_chain import (
    SECRET_MARKERS,
    AuditKind,
    AuditRecord,
    ChainProblem,
    DetailValue,
    MalformedAuditRecord,
    VerifyResult,
    canonical_json,
    chain_next,
    decode_record,
    encode_record,
    record_hash,
    redact_details,
    verify_chain,
)
from sharedsync.core.errors import InvalidArgument


def make_chain(n: int, start: AuditRecord | None = None) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = start
    for i in range(n):
        prev = chain_next(prev, time_ns=1_000 + i, node=f"node-{i % 3}",
                          kind=list(AuditKind)[i % len(AuditKind)], volume=f"vol-{i % 2}",
                          details={"bytes": i * 10, "ratio": i / 4, "full": i % 2 == 0,
                                   "snapshot": f"s{i}"})
        records.append(prev)
    return records


# -- records -------------------------------------------------------------------------------------


def test_first_record_and_its_canonical_form() -> None:
    record = chain_next(None, time_ns=5, node="n1", kind=AuditKind.PROMOTION, volume="vol-1",
                        details={"to": "n1", "epoch": 3, "from": "n2", "forced": False})
    assert record.seq == 0
    assert record.prev_hash is None
    assert record.details == (("epoch", 3), ("forced", False), ("from", "n2"), ("to", "n1"))
    body = ('{"details":{"epoch":3,"forced":false,"from":"n2","to":"n1"},"kind":"promotion",'
            '"node":"n1","prev_hash":null,"seq":0,"time_ns":5,"volume":"vol-1"}')
    assert canonical_json(record.body()) == body
    assert record.hash == blake3.blake3(body.encode()).hexdigest()
    assert record.to_json() == (
        '{"details":{"epoch":3,"forced":false,"from":"n2","to":"n1"},'
        f'"hash":"{record.hash}","kind":"promotion","node":"n1","prev_hash":null,"seq":0,'
        '"time_ns":5,"volume":"vol-1"}'
    )


def test_next_record_links_to_the_previous() -> None:
    first, second = make_chain(2)
    assert second.seq == 1
    assert second.prev_hash == first.hash
    assert record_hash(second) == second.hash


def test_canonical_json_is_ascii_and_refuses_nan() -> None:
    assert canonical_json({"b": "é", "a": 1}) == '{"a":1,"b":"\\u00e9"}'
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"x": float("nan")})


@given(st.lists(st.integers(0, 5), min_size=1, max_size=5))
def test_json_round_trip(sizes: list[int]) -> None:
    for record in make_chain(len(sizes)):
        again = AuditRecord.from_json(record.to_json())
        assert again == record
        assert record_hash(again) == record.hash


def test_encode_and_decode_log_lines() -> None:
    record = make_chain(1)[0]
    line = encode_record(record)
    assert line == record.to_json().encode()
    assert decode_record(line) == record
    assert decode_record(line + b"\n") == record
    assert decode_record(line.decode()) == record


@pytest.mark.parametrize("line", [b"", b"{", b"\xff\xfe", b'{"seq":0}', b"[]"])
def test_a_malformed_line_is_both_invalid_argument_and_value_error(line: bytes) -> None:
    with pytest.raises(MalformedAuditRecord) as info:
        decode_record(line)
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"seq":0}', "fields must be exactly"),
    ],
)
def test_from_json_refuses_malformed_lines(line: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        AuditRecord.from_json(line)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("kind", "mutiny", "unknown audit record kind"),
        ("seq", True, "seq"),
        ("seq", -1, "seq"),
        ("time_ns", 1.5, "time_ns"),
        ("node", "", "node"),
        ("volume", 3, "volume"),
        ("details", [], "details must be an object"),
        ("details", {"x": [1]}, "string, number or boolean"),
        ("hash", "ABC", "hash"),
        ("prev_hash", 7, "prev_hash"),
    ],
)
def test_from_json_checks_every_field(field: str, value: object, match: str) -> None:
    raw = json.loads(make_chain(1)[0].to_json())
    raw[field] = value
    with pytest.raises(InvalidArgument, match=match):
        AuditRecord.from_json(json.dumps(raw))


def test_from_json_refuses_nan_details() -> None:
    raw = make_chain(1)[0].to_json().replace('"bytes":0', '"bytes":NaN')
    with pytest.raises(InvalidArgument, match="finite"):
        AuditRecord.from_json(raw)


@pytest.mark.parametrize(
    "details",
    [{"x": float("inf")}, {"x": None}, {"x": {"nested": 1}}, {1: "int key"}],
)
def test_chain_next_refuses_bad_details(details: dict[object, object]) -> None:
    with pytest.raises(InvalidArgument):
        chain_next(None, time_ns=0, node="n", kind=AuditKind.SYNC,
                   details=details)  # type: ignore[arg-type]


def test_chain_next_refuses_bad_fields() -> None:
    with pytest.raises(InvalidArgument, match="node"):
        chain_next(None, time_ns=0, node="", kind=AuditKind.SYNC)
    with pytest.raises(InvalidArgument, match="unknown audit record kind 'mutiny'"):
        chain_next(None, time_ns=0, node="n", kind="mutiny")
    assert chain_next(None, time_ns=0, node="n", kind="repair").kind is AuditKind.REPAIR


# -- redaction -----------------------------------------------------------------------------------


def test_redaction_table() -> None:
    details: dict[str, DetailValue] = {
        "password": "p", "DB_PASSWORD": "p", "passwd": "p", "apiKey": "k", "ssh-key": "k",
        "x-auth-token": "t", "clientSecret": "s", "Credentials": "c", "cookie": "c",
        "Authorization": "Bearer x",
        "volume": "vol-1", "bytes": 10, "node": "n1", "ratio": 0.5, "ok": True,
    }
    assert redact_details(details) == {"volume": "vol-1", "bytes": 10, "node": "n1",
                                       "ratio": 0.5, "ok": True}
    # Deliberately broad: a harmless key that merely contains a marker is dropped too.
    assert redact_details({"keyspace": "x"}) == {}


def test_secrets_never_reach_a_record() -> None:
    record = chain_next(None, time_ns=0, node="n", kind=AuditKind.POLICY,
                        details={"name": "fast", "token": "s3cr3t", "secretRef": "x"})
    assert record.detail_map == {"name": "fast"}
    assert "s3cr3t" not in record.to_json()


@given(st.dictionaries(st.text(max_size=20), st.integers()))
def test_redaction_drops_exactly_the_secret_looking_keys(details: dict[str, int]) -> None:
    kept = redact_details(details)
    for key in details:
        looks_secret = any(m in key.lower() for m in SECRET_MARKERS)
        assert (key in kept) != looks_secret


# -- verification: table -------------------------------------------------------------------------


def test_a_good_chain_verifies() -> None:
    records = make_chain(5)
    assert verify_chain(records) == VerifyResult(ok=True, verified=5,
                                                 last_hash=records[-1].hash, last_seq=4)
    assert verify_chain([]) == VerifyResult(ok=True, verified=0, last_hash=None, last_seq=None)


def test_rotated_files_verify_as_one_chain() -> None:
    records = make_chain(7)
    first = verify_chain(records[:3])
    assert first.ok
    second = verify_chain(records[3:], start_prev_hash=first.last_hash)
    assert second.ok
    assert second.last_hash == records[-1].hash
    # Alone, the second file is not the start of a chain.
    assert verify_chain(records[3:]).problem is ChainProblem.GAP
    # Attached to the wrong predecessor, it does not verify either.
    assert verify_chain(records[3:], start_prev_hash=records[1].hash).problem is \
        ChainProblem.BROKEN_LINK


def _problem(records: list[AuditRecord], **kwargs: str) -> tuple[ChainProblem | None, int | None]:
    result = verify_chain(records, **kwargs)
    assert not result.ok
    assert result.message
    return result.problem, result.index


def test_each_problem_is_named_where_it_starts() -> None:
    r = make_chain(5)
    edited = dataclasses.replace(r[2], volume="vol-x")
    assert _problem([r[0], r[1], edited, r[3], r[4]]) == (ChainProblem.EDITED, 2)
    assert _problem([r[0], r[1], r[3], r[4]]) == (ChainProblem.GAP, 2)
    assert _problem([r[0], r[1], r[3], r[2], r[4]]) == (ChainProblem.GAP, 2)
    assert _problem([r[0], r[1], r[2], r[2], r[3]]) == (ChainProblem.REORDERED, 3)
    assert _problem([r[1], r[2]]) == (ChainProblem.GAP, 0)
    assert _problem(r[:3], expected_head=r[4].hash) == (ChainProblem.TRUNCATED, 3)
    assert verify_chain(r, expected_head=r[4].hash).ok


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link() -> None:
    r = make_chain(4)
    forged = dataclasses.replace(r[1], details=(("bytes", 0),))
    forged = dataclasses.replace(forged, hash=record_hash(forged))
    assert _problem([r[0], forged, r[2], r[3]]) == (ChainProblem.BROKEN_LINK, 2)
    # A forged newest record needs the head anchor to be caught.
    forged_tail = dataclasses.replace(r[3], node="elsewhere")
    forged_tail = dataclasses.replace(forged_tail, hash=record_hash(forged_tail))
    assert verify_chain([*r[:3], forged_tail]).ok
    assert _problem([*r[:3], forged_tail], expected_head=r[3].hash) == (
        ChainProblem.TRUNCATED, 4)


def test_a_record_spliced_in_from_another_chain_is_caught() -> None:
    ours, theirs = make_chain(3), make_chain(3, start=make_chain(1)[0])
    assert theirs[1].seq == 2
    assert _problem([ours[0], ours[1], theirs[1]]) == (ChainProblem.BROKEN_LINK, 2)


def test_a_record_with_unhashable_content_counts_as_edited() -> None:
    r = make_chain(2)
    bad = dataclasses.replace(r[1], details=(("x", float("nan")),))
    assert _problem([r[0], bad]) == (ChainProblem.EDITED, 1)


# -- verification: properties --------------------------------------------------------------------

detail_values = st.one_of(st.text(max_size=10), st.integers(), st.booleans(),
                          st.floats(allow_nan=False, allow_infinity=False))
detail_maps = st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=6), detail_values,
                              max_size=4)
events = st.tuples(st.integers(0, 2**63), st.text(min_size=1, max_size=8),
                   st.sampled_from(list(AuditKind)), st.text(max_size=8), detail_maps)
chains = st.lists(events, min_size=1, max_size=8).map(
    lambda evs: _build(evs))


def _build(evs: list[tuple[int, str, AuditKind, str, dict[str, DetailValue]]]
           ) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev: AuditRecord | None = None
    for time_ns, node, kind, volume, details in evs:
        prev = chain_next(prev, time_ns=time_ns, node=node, kind=kind, volume=volume,
                          details=details)
        records.append(prev)
    return records


hashes = st.text("0123456789abcdef", min_size=64, max_size=64)


def _edit(record: AuditRecord, field: str, pick: st.DataObject) -> AuditRecord:
    if field == "seq":
        return dataclasses.replace(record, seq=pick.draw(st.integers(0, 2**40)))
    if field == "time_ns":
        return dataclasses.replace(record, time_ns=pick.draw(st.integers()))
    if field == "node":
        return dataclasses.replace(record, node=pick.draw(st.text(min_size=1, max_size=8)))
    if field == "kind":
        return dataclasses.replace(record, kind=pick.draw(st.sampled_from(list(AuditKind))))
    if field == "volume":
        return dataclasses.replace(record, volume=pick.draw(st.text(max_size=8)))
    if field == "details":
        details = pick.draw(detail_maps)
        return dataclasses.replace(record, details=tuple(sorted(details.items())))
    if field == "prev_hash":
        return dataclasses.replace(record, prev_hash=pick.draw(st.none() | hashes))
    return dataclasses.replace(record, hash=pick.draw(hashes))


@given(chains, st.sampled_from([f.name for f in dataclasses.fields(AuditRecord)]), st.data())
def test_any_single_field_edit_of_any_record_is_caught(records: list[AuditRecord], field: str,
                                                       pick: st.DataObject) -> None:
    i = pick.draw(st.integers(0, len(records) - 1))
    edited = _edit(records[i], field, pick)
    assume(edited.to_json() != records[i].to_json())
    tampered = [*records[:i], edited, *records[i + 1:]]
    result = verify_chain(tampered)
    assert not result.ok
    assert result.index == i
    assert result.problem is ChainProblem.EDITED
    assert result.verified == i


@given(chains.filter(lambda r: len(r) >= 2), st.data())
def test_any_deletion_before_the_end_is_caught(records: list[AuditRecord],
                                               pick: st.DataObject) -> None:
    i = pick.draw(st.integers(0, len(records) - 2))
    result = verify_chain([*records[:i], *records[i + 1:]])
    assert not result.ok
    assert result.index == i
    assert result.problem is ChainProblem.GAP


@given(chains, st.data())
def test_tail_truncation_is_caught_with_the_head_anchor(records: list[AuditRecord],
                                                        pick: st.DataObject) -> None:
    keep = pick.draw(st.integers(0, len(records) - 1))
    assert verify_chain(records[:keep]).ok  # invisible without an anchor...
    result = verify_chain(records[:keep], expected_head=records[-1].hash)
    assert result.problem is ChainProblem.TRUNCATED  # ...caught with one


@given(chains, st.data())
def test_any_reordering_is_caught(records: list[AuditRecord], pick: st.DataObject) -> None:
    order = pick.draw(st.permutations(range(len(records))))
    assume(order != sorted(order))
    assert not verify_chain([records[j] for j in order]).ok


@given(chains, st.data())
def test_any_split_into_files_verifies(records: list[AuditRecord], pick: st.DataObject) -> None:
    cuts = sorted(pick.draw(st.lists(st.integers(0, len(records)), max_size=3)))
    start: str | None = None
    for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True):
        result = verify_chain(records[a:b], start_prev_hash=start)
        assert result.ok
        start = result.last_hash
    assert start == records[-1].hash
