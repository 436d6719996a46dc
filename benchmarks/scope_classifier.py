"""Scope classifier on the KnowEdit dev files: precision / recall / FPR and latency.

    .venv/bin/python benchmarks/scope_classifier.py [--limit N] [--k 5] [--latency-queries 300]

Per dataset (ZsRE, WikiData_counterfact, WikiData_recent):

* own edit — each query scored against its own record's edit (for a locality prompt the
  hardest candidate: same subject, another relation);
* memory — all dev edits of the file in one memory, top-k retrieved by MiniLM cosine; in scope
  when any candidate scores ≥ threshold (a positive only counts if its own edit does);
* portability prompts' in-scope rate (not a target; shown for information).

Latency (p50/p90, ms): scope scoring of k candidates for a new query (candidate features
cached, as they are after an edit's first use), the same with cold candidates, and retrieval
(query embedding + exact top-k over the dev edits) with a separate encoder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from memedit.datasets import load_requests
from memedit.scope import load_scope_classifier
from memedit.scope.encoder import TokenEncoder
from memedit.scope.evaluate import (
    asks_edited_fact,
    evaluate_memory,
    evaluate_own_edit,
    queries_of,
)
from memedit.scope.features import content_words
from memedit.types import EditRequest

DATASETS = ("ZsRE", "WikiData_counterfact", "WikiData_recent")


def same_relation(query: str, request: EditRequest) -> bool:
    """A locality prompt whose relation words all occur in the edit prompt ("The father of X
    is" for "Who was X's father?"): it asks the edited relation, so firing on it is right."""
    if not request.subject or query in request.rephrase or query == request.prompt:
        return False
    relation = content_words(query) - content_words(request.subject)
    return bool(relation) and relation <= content_words(request.prompt)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000.0, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="records per dataset")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()

    t0 = time.perf_counter()
    scope = load_scope_classifier(progress=False)
    print(
        f"load_scope_classifier: {time.perf_counter() - t0:.2f} s; {scope.name}, "
        f"threshold {scope.threshold:.4f}"
    )
    retrieval = TokenEncoder(cache_size=0)
    lat_scope: list[float] = []
    lat_cold: list[float] = []
    lat_retr: list[float] = []
    for ds in args.datasets:
        requests = load_requests(ds, limit=args.limit)
        queries = queries_of(requests)
        own = evaluate_own_edit(scope, requests, queries)
        print(f"\n{ds} ({len(requests)} edits, {len(queries)} queries)")
        print(f"  own edit : {own.summary()}")
        same = [same_relation(q.text, requests[q.record]) for q in queries]
        if any(same):
            other = [q for q, s in zip(queries, same, strict=True) if not s]
            rest = evaluate_own_edit(scope, requests, other)
            n_same = sum(same)
            print(
                f"  own edit, without the {n_same} locality prompts that name the edit's own "
                f"relation: FPR {rest.fpr:.3f}"
            )
        old = {
            (i, p.prompt)
            for i, r in enumerate(requests)
            for p in r.locality
            if asks_edited_fact(r, p)
        }
        if old:
            kept = [q for q in queries if not (q.locality and (q.record, q.text) in old)]
            rest = evaluate_own_edit(scope, requests, kept)
            print(
                f"  own edit, without the {len(queries) - len(kept)} locality prompts whose "
                f"answer is the edit's old answer: recall {rest.recall:.3f} FPR {rest.fpr:.3f}"
            )
        edit_vecs = np.stack(
            [e.sentence for e in scope.encoder.encode([r.prompt for r in requests])]
        )
        query_vecs = np.stack([e.sentence for e in scope.encoder.encode([q.text for q in queries])])
        mem = evaluate_memory(scope, requests, query_vecs, edit_vecs, queries, k=args.k)
        print(f"  memory   : {mem.summary()}")
        prompts = {r.prompt: i for i, r in enumerate(requests)}
        keep = [not (q.locality and prompts.get(q.text, q.record) != q.record) for q in queries]
        if not all(keep):
            sub = [q for q, k in zip(queries, keep, strict=True) if k]
            mem2 = evaluate_memory(
                scope, requests, query_vecs[np.array(keep)], edit_vecs, sub, k=args.k
            )
            print(
                f"  memory, without the {len(keep) - sum(keep)} locality prompts that are "
                f"another edit's prompt: FPR {mem2.fpr:.3f}"
            )
        port = queries_of(requests, portability=True)
        port = [q for q in port if q.kind.startswith("portability:")]
        if port:
            prep = evaluate_own_edit(scope, requests, port)
            rates = ", ".join(f"{k} {v:.3f}" for k, v in prep.rates.items())
            print(f"  portability in-scope (own edit, info): {rates}")

        # latency on fresh queries (never encoded before: their own cache is cleared)
        rng = np.random.default_rng(0)
        picks = rng.choice(
            len(queries), size=min(args.latency_queries, len(queries)), replace=False
        )
        for j in picks:
            q = queries[int(j)].text + " "  # a string not in any cache
            t = time.perf_counter()
            qv = retrieval.encode([q])[0].sentence
            top = np.argsort(-(edit_vecs @ qv))[: args.k]
            lat_retr.append(time.perf_counter() - t)
            cands = [requests[int(i)] for i in top]
            scope.score(queries[int((j + 1) % len(queries))].text + "  ", cands)  # warm edits
            scope.encoder._cache.pop(q, None)
            t = time.perf_counter()
            scope.score(q, cands)
            lat_scope.append(time.perf_counter() - t)
        for j in picks[:50]:
            scope._edits.clear()
            scope.encoder._cache.clear()
            q = queries[int(j)].text + "   "
            cands = [requests[int(i)] for i in range(int(j) % 7, len(requests), 97)][: args.k]
            t = time.perf_counter()
            scope.score(q, cands)
            lat_cold.append(time.perf_counter() - t)
    print(
        f"\nlatency, k={args.k} (ms): scope p50 {_pct(lat_scope, 50):.1f} "
        f"p90 {_pct(lat_scope, 90):.1f} (n={len(lat_scope)}); "
        f"retrieval p50 {_pct(lat_retr, 50):.1f} p90 {_pct(lat_retr, 90):.1f}; "
        f"scope with cold candidates p50 {_pct(lat_cold, 50):.1f}"
    )
    total = [a + b for a, b in zip(lat_scope, lat_retr, strict=True)]
    print(f"routing overhead (retrieval + scope) p50 {_pct(total, 50):.1f} ms")


if __name__ == "__main__":
    main()
