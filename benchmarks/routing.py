"""Routing overhead on out-of-scope queries vs the default model generating 20 tokens.

    python benchmarks/routing.py [--edits 1000] [--queries 30]

The memory holds real KnowEdit edits; queries are KnowEdit locality prompts of *other*
records (out of scope). Overhead = retrieval + scope classification, measured per query.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from memedit.datasets import load_requests
    from memedit.editable import EditableModel
    from memedit.generation import greedy_generate

    pool = load_requests("CounterFact", limit=args.edits + args.queries)
    edits, held = pool[: args.edits], pool[args.edits :]
    em = EditableModel.load(args.model, memory=tempfile.mkdtemp(prefix="bench-route-"))
    assert em.model is not None and em.tokenizer is not None
    em.edit(edits)
    queries = [r.locality[0].prompt if r.locality else r.prompt for r in held]
    em.route(queries[0])  # warm up
    greedy_generate(em.model, em.tokenizer, queries[0], max_new_tokens=20)

    route_ms, gen_ms, oos = [], [], 0
    for q in queries:
        t0 = time.perf_counter()
        d = em.route(q)
        route_ms.append(1000 * (time.perf_counter() - t0))
        oos += not d.in_scope
        t1 = time.perf_counter()
        greedy_generate(em.model, em.tokenizer, q, max_new_tokens=20)
        gen_ms.append(1000 * (time.perf_counter() - t1))
    r50, g50 = statistics.median(route_ms), statistics.median(gen_ms)
    print(f"{len(edits)} edits in memory; {len(queries)} unrelated queries, {oos} out of scope")
    print(
        f"routing (retrieve k={em.config.k} + scope) p50 {r50:.1f} ms, "
        f"p95 {sorted(route_ms)[int(0.95 * (len(route_ms) - 1))]:.1f} ms"
    )
    print(f"20-token greedy generation p50 {g50:.0f} ms")
    print(f"overhead {100 * r50 / g50:.2f}% of generation (floor: <= 5%)")
    em.close()


if __name__ == "__main__":
    main()
