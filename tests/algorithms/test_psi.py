"""Private set intersection: exact results, what each side learns, and malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.errors import UserError
from splitfed.psi import (
    PsiQuerier,
    PsiResponder,
    check_ids,
    decode_ids,
    encode_ids,
    from_wire,
    intersect,
    request_size,
    to_wire,
)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def test_partial_overlap_is_the_true_intersection() -> None:
    a = ids("r", 60)
    b = ids("r", 100)[30:] + ids("q", 20)
    got = intersect(a, b)
    assert got == [i for i in a if i in set(b)]
    assert len(got) == 30


def test_empty_overlap_and_empty_sets() -> None:
    assert intersect(ids("a", 10), ids("b", 10)) == []
    assert intersect([], ids("b", 5)) == []
    assert intersect(ids("a", 5), []) == []


def test_full_overlap_in_any_order() -> None:
    a = ids("r", 40)
    b = list(reversed(a))
    assert intersect(a, b) == a


def test_duplicates_count_once() -> None:
    # PSI works on sets: repeats on either side neither add nor lose elements.
    got = intersect(["a", "b", "b", "c", "x"], ["c", "b", "c", "d"])
    assert got == ["b", "c"]


def test_gcs_structure_gives_the_same_result() -> None:
    a, b = ids("r", 50), ids("r", 80)[25:]
    assert intersect(a, b, structure="gcs") == intersect(a, b, structure="raw")


def test_responder_learns_only_the_query_size() -> None:
    mine = ids("r", 30)
    querier = PsiQuerier(mine)
    request = querier.request()
    responder = PsiResponder(ids("r", 50)[20:])
    setup, response = responder.respond(request)
    assert responder.queries_seen == [30]
    assert request_size(request) == 30
    # The query carries encrypted points, not the ids (nor any id as a substring).
    assert not any(i.encode() in request for i in mine)
    assert querier.intersection(setup, response) == mine[20:]


def test_querier_cannot_read_ids_outside_the_intersection() -> None:
    theirs = ids("secret", 40) + ids("r", 10)
    querier = PsiQuerier(ids("r", 10) + ids("mine", 5))
    setup, response = PsiResponder(theirs).respond(querier.request())
    # The answer holds the responder's ids only encrypted under its key: none is readable.
    for blob in (setup, response):
        assert not any(i.encode() in blob for i in theirs)
    assert querier.intersection(setup, response) == ids("r", 10)


def test_malformed_and_mismatched_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="malformed PSI"):
        PsiResponder(ids("r", 5)).respond(b"\xff\xff garbage")
    q1, q2 = PsiQuerier(ids("r", 5)), PsiQuerier(ids("r", 7))
    setup, response = PsiResponder(ids("r", 9)).respond(q2.request())
    with pytest.raises(ValueError, match="does not answer"):
        q1.intersection(setup, response)
    with pytest.raises(ValueError, match="malformed PSI"):
        q1.intersection(b"\x01junk", response)


def test_id_checks_and_wire_round_trip() -> None:
    with pytest.raises(UserError, match="more than once"):
        check_ids(["a", "b", "a"], "owner-0")
    with pytest.raises(UserError, match="not 1-128 characters"):
        check_ids(["ok", "bad id\n"], "owner-0")
    with pytest.raises(UserError, match="not 1-128"):
        check_ids([3], "owner-0")
    blob = b"\x00\x01\xfe"
    arr = to_wire(blob)
    assert arr.dtype == np.uint8 and from_wire(arr) == blob
    assert decode_ids(encode_ids(["a", "b-1"])) == ["a", "b-1"]
    assert decode_ids(encode_ids([])) == []
    with pytest.raises(ValueError, match="malformed record id"):
        decode_ids(to_wire(b"a\nb c"))
    with pytest.raises(UserError, match="unknown PSI data structure"):
        PsiResponder(["a"], structure="bloom")
