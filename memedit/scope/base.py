"""The scope-classifier protocol the router talks to, and small shared checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from memedit.errors import InvalidRequestError
from memedit.types import EditRequest


@runtime_checkable
class ScopeClassifier(Protocol):
    """Decides whether a query asks about the fact of a candidate edit.

    ``score`` returns one probability in [0, 1] per candidate (higher: the query is about that
    edit's fact); the router treats a candidate as in scope when its score is ``>= threshold``.
    """

    name: str
    threshold: float

    def score(self, query: str, candidates: Sequence[EditRequest]) -> list[float]: ...

    def score_batch(self, pairs: Sequence[tuple[str, EditRequest]]) -> list[float]: ...


def check_query(query: object) -> str:
    """Validate a query string, naming the bad value."""
    if not isinstance(query, str) or not query.strip():
        msg = f"query must be a non-empty string, got {query!r:.80}"
        raise InvalidRequestError(msg, field="query", value=query)
    return query


def check_candidates(candidates: object) -> list[EditRequest]:
    """Validate a candidate list: a sequence of `EditRequest`s (may be empty)."""
    if not isinstance(candidates, Sequence) or isinstance(candidates, str):
        msg = f"candidates must be a list of EditRequest, got {type(candidates).__name__}"
        raise InvalidRequestError(msg, field="candidates", value=candidates)
    out: list[EditRequest] = []
    for i, c in enumerate(candidates):
        if not isinstance(c, EditRequest):
            msg = f"candidates[{i}] must be an EditRequest, got {type(c).__name__}"
            raise InvalidRequestError(msg, field=f"candidates[{i}]", value=c)
        out.append(c)
    return out


def subject_of(request: EditRequest) -> str:
    """The edit's subject: ``request.subject``, else the upstream one kept in ``meta``."""
    if request.subject:
        return request.subject
    meta_subject = request.meta.get("subject") if request.meta else None
    return meta_subject if isinstance(meta_subject, str) else ""
