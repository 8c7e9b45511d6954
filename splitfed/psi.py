"""Private set intersection (ECDH, the openmined-psi library) for aligning vertical partitions.

PyVertical links the records that several parties hold about the same people without any of
them revealing the ids they hold outside the common set. Two roles:

* `PsiQuerier` (the label holder, PSI *client*): encrypts its ids under its own key and learns
  which of them the other party holds. It learns nothing about the other party's other ids.
* `PsiResponder` (a data owner, PSI *server*): answers a query with its ids encrypted under its
  own key. It learns only how many ids were in the query, never which.

The protocol messages are serialized protobufs; they travel inside wire messages as uint8
tensors (`to_wire` / `from_wire`), so nothing on the wire is executable.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import private_set_intersection.python as psi

from splitfed.errors import UserError

# RAW (the encrypted ids themselves) makes the intersection exact; GCS is smaller but has a
# false-positive rate. The rate below only matters for GCS and Bloom filters.
DEFAULT_FPR = 1e-9
RECORD_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
_STRUCTURES = {"raw": psi.DataStructure.RAW, "gcs": psi.DataStructure.GCS}


def check_ids(ids: Iterable[object], who: str) -> list[str]:
    """Record ids as a list of strings; duplicates and odd characters are the user's mistake."""
    out = [i for i in ids]
    bad = [i for i in out if not isinstance(i, str) or not RECORD_ID_PATTERN.match(i)]
    if bad:
        raise UserError(
            f"{who}: record id {bad[0]!r} is not 1-128 characters of A-Z a-z 0-9 _ . : @ -"
        )
    if len(set(out)) != len(out):
        dup = next(i for i, c in Counter(out).items() if c > 1)
        raise UserError(f"{who}: record id {dup!r} occurs more than once; ids must be unique")
    return out


def unique(ids: Iterable[str]) -> list[str]:
    """Ids in first-seen order without repeats (PSI works on sets)."""
    return list(dict.fromkeys(ids))


def to_wire(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def from_wire(arr: np.ndarray) -> bytes:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError("PSI payload must be a 1-D uint8 tensor")
    return arr.tobytes()


def encode_ids(ids: Sequence[str]) -> np.ndarray:
    """Ids as one uint8 tensor (newline-separated UTF-8), for the alignment message."""
    return to_wire("\n".join(ids).encode("utf-8"))


def decode_ids(arr: np.ndarray) -> list[str]:
    text = from_wire(arr).decode("utf-8", errors="strict") if arr.size else ""
    ids = text.split("\n") if text else []
    bad = [i for i in ids if not RECORD_ID_PATTERN.match(i)]
    if bad:
        raise ValueError(f"malformed record id {bad[0][:40]!r} in id list")
    return ids


def _parse(kind: type, data: bytes) -> object:
    try:
        return kind.FromString(data)  # type: ignore[attr-defined]
    except Exception as e:  # protobuf raises DecodeError; anything else is as bad
        raise ValueError(f"malformed PSI {kind.__name__}: {e}") from None


class PsiQuerier:
    """The label holder's side: one key, one request, reused with every owner."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = unique(ids)
        self._client = psi.client.CreateWithNewKey(True)
        self._request: bytes | None = None

    def request(self) -> bytes:
        """The query: this party's ids, each encrypted under its secret key (shuffled)."""
        if self._request is None:
            self._request = self._client.CreateRequest(self.ids).SerializeToString()
        return self._request

    def intersection(self, setup: bytes, response: bytes) -> list[str]:
        """Those of this party's ids that the responder holds, in this party's order."""
        s = _parse(psi.ServerSetup, setup)
        r = _parse(psi.Response, response)
        if len(r.encrypted_elements) != len(self.ids):  # type: ignore[attr-defined]
            raise ValueError("PSI response does not answer this party's request")
        try:
            idx = self._client.GetIntersection(s, r)
        except Exception as e:  # the C++ layer rejects invalid curve points
            raise ValueError(f"PSI response could not be processed: {e}") from None
        return [self.ids[i] for i in sorted(set(idx))]


class PsiResponder:
    """A data owner's side: answers a query; learns only the query's size."""

    def __init__(
        self, ids: Iterable[str], structure: str = "raw", fpr: float = DEFAULT_FPR
    ) -> None:
        if structure not in _STRUCTURES:
            raise UserError(f"unknown PSI data structure {structure!r}: use raw or gcs")
        self.ids = unique(ids)
        self.structure = _STRUCTURES[structure]
        self.fpr = fpr
        self._server = psi.server.CreateWithNewKey(True)
        self.queries_seen: list[int] = []  # what this party learned: the size of each query

    def respond(self, request: bytes) -> tuple[bytes, bytes]:
        """(setup, response): this party's ids encrypted once, and the query encrypted again."""
        req = _parse(psi.Request, request)
        n = len(req.encrypted_elements)  # type: ignore[attr-defined]
        if not req.reveal_intersection:  # type: ignore[attr-defined]
            raise ValueError("PSI request does not ask for the intersection")
        try:
            setup = self._server.CreateSetupMessage(self.fpr, max(n, 1), self.ids, self.structure)
            response = self._server.ProcessRequest(req)
        except Exception as e:  # invalid curve points in a forged request
            raise ValueError(f"PSI request could not be processed: {e}") from None
        self.queries_seen.append(n)
        return setup.SerializeToString(), response.SerializeToString()


def request_size(request: bytes) -> int:
    """How many encrypted ids a request carries: all that a responder learns from it."""
    return len(_parse(psi.Request, request).encrypted_elements)  # type: ignore[attr-defined]


def intersect(
    querier_ids: Iterable[str], responder_ids: Iterable[str], structure: str = "raw"
) -> list[str]:
    """One complete PSI run between two local parties; the querier's view of the result."""
    q = PsiQuerier(querier_ids)
    setup, response = PsiResponder(responder_ids, structure).respond(q.request())
    return q.intersection(setup, response)
