"""Recall / false-positive rate of a scope classifier on KnowEdit records.

Two settings:

* **own edit** — each query scored against its own record's edit, the hardest candidate for
  a locality prompt (same subject, another relation);
* **memory** — every edit of the file in one memory: the query retrieves its top-k edits by
  MiniLM cosine and is in scope when any candidate scores at or above the threshold; a
  positive counts only if its own edit is among those in scope.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from memedit.scope.base import ScopeClassifier
from memedit.types import EditRequest, Probe

POSITIVE_KINDS = ("prompt", "rephrase")


@dataclass(frozen=True)
class Query:
    text: str
    record: int  # index of its own edit in the request list
    kind: str  # "prompt", "rephrase", "locality:<kind>", "portability:<kind>"

    @property
    def positive(self) -> bool:
        return self.kind in POSITIVE_KINDS

    @property
    def locality(self) -> bool:
        return self.kind.startswith("locality:")


def queries_of(requests: Sequence[EditRequest], *, portability: bool = False) -> list[Query]:
    out: list[Query] = []
    for i, r in enumerate(requests):
        out.append(Query(r.prompt, i, "prompt"))
        out.extend(Query(t, i, "rephrase") for t in r.rephrase)
        out.extend(Query(p.prompt, i, f"locality:{p.kind}") for p in r.locality)
        if portability:
            out.extend(Query(p.prompt, i, f"portability:{p.kind}") for p in r.portability)
    return out


def _norm(answer: str) -> str:
    return " ".join(answer.lower().split())


def asks_edited_fact(request: EditRequest, probe: Probe) -> bool:
    """A locality probe whose expected answer is one of the edit's *old* answers.

    KnowEdit's locality prompts share the edit's subject; when one also shares its pre-edit
    answer ("The constellation of Butterfly Cluster is" → Scorpius, for the edit "What
    constellation is home to Butterfly Cluster?" whose old answer is Scorpius) it asks the
    edited fact itself in other words, so routing it to the edit is right even though the
    benchmark counts its change against locality. Data-derived: no judgement of relations.
    A different relation with the same answer (a film's director who also edited it) is
    rare but possible, so figures without these probes are given beside, never instead of,
    the figures over every probe.
    """
    old = {_norm(a) for a in request.ground_truth if a.strip()}
    return bool(old) and any(_norm(a) in old for a in probe.answers)


@dataclass
class Report:
    """In-scope rates per query kind, plus the headline figures."""

    threshold: float
    rates: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    recall: float = 0.0
    fpr: float = 0.0
    precision: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.3f} (n={self.counts[k]})" for k, v in self.rates.items())
        return (
            f"recall {self.recall:.3f}  FPR {self.fpr:.3f}  precision {self.precision:.3f}  "
            f"[{kinds}]"
        )


def _report(queries: Sequence[Query], fired: Sequence[bool], threshold: float) -> Report:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for q, f in zip(queries, fired, strict=True):
        by_kind[q.kind].append(f)
    pos = [f for q, f in zip(queries, fired, strict=True) if q.positive]
    neg = [f for q, f in zip(queries, fired, strict=True) if q.locality]
    tp, fp = sum(pos), sum(neg)
    return Report(
        threshold=threshold,
        rates={k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        counts={k: len(v) for k, v in sorted(by_kind.items())},
        recall=float(np.mean(pos)) if pos else 0.0,
        fpr=float(np.mean(neg)) if neg else 0.0,
        precision=tp / (tp + fp) if tp + fp else 0.0,
    )


def own_edit_scores(
    scope: ScopeClassifier, requests: Sequence[EditRequest], queries: Sequence[Query]
) -> np.ndarray:
    return np.array(scope.score_batch([(q.text, requests[q.record]) for q in queries]))


def evaluate_own_edit(
    scope: ScopeClassifier,
    requests: Sequence[EditRequest],
    queries: Sequence[Query] | None = None,
    *,
    threshold: float | None = None,
) -> Report:
    qs = list(queries) if queries is not None else queries_of(requests)
    t = scope.threshold if threshold is None else threshold
    scores = own_edit_scores(scope, requests, qs)
    return _report(qs, [bool(s >= t) for s in scores], t)


def evaluate_memory(
    scope: ScopeClassifier,
    requests: Sequence[EditRequest],
    query_vectors: np.ndarray,
    edit_vectors: np.ndarray,
    queries: Sequence[Query],
    *,
    k: int = 5,
    threshold: float | None = None,
) -> Report:
    """All `requests` in one memory; `*_vectors` are L2-normalised retrieval embeddings."""
    t = scope.threshold if threshold is None else threshold
    sims = query_vectors @ edit_vectors.T
    top = np.argsort(-sims, axis=1)[:, :k]
    pairs = [(q.text, requests[j]) for q, row in zip(queries, top, strict=True) for j in row]
    scores = np.array(scope.score_batch(pairs)).reshape(len(queries), -1)
    fired: list[bool] = []
    for q, row, sc in zip(queries, top, scores, strict=True):
        if q.positive:
            fired.append(bool(any(j == q.record and s >= t for j, s in zip(row, sc, strict=True))))
        else:
            fired.append(bool((sc >= t).any()))
    return _report(queries, fired, t)
