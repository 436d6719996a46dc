"""GRACE's inference overhead on out-of-scope queries: greedy generation of 20 tokens on the
default model with and without a codebook of N entries (keys from N real ZsRE dev prompts).

    python benchmarks/adapter_overhead.py [--entries 500] [--queries 30] [--rounds 3]

The lookup's cost does not depend on what the values hold, so each entry's value is its own
key (no training: the codebook is built through the same commit path, radii by the same
rules). Queries are locality prompts of other ZsRE records; the script checks each is out of
every radius (its answer unchanged). The two conditions alternate query by query, so a busy
machine slows both alike; overhead = median(with) / median(without) - 1.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=500)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import torch

    from memedit.adapters import GraceAdapter, GraceHparams, Item
    from memedit.adapters.codebook import item_to_bytes
    from memedit.datasets import load_requests
    from memedit.generation import greedy_generate
    from memedit.hooks import trace
    from memedit.intrinsic.compute import block_name
    from memedit.models import load_model

    model, tok = load_model(args.model) if args.model else load_model()
    pool = load_requests("ZsRE", limit=args.entries + args.queries)
    edits, held = pool[: args.entries], pool[args.entries :]
    hp = GraceHparams()
    module = block_name(model, hp.layer_for(model))
    payloads = []
    t0 = time.perf_counter()
    for r in edits:
        ids = tok(r.prompt, return_tensors="pt").to(model.device)
        with torch.no_grad(), trace(model, [module]) as tr:
            model(**ids)
        key = tr[module][0, -1].float()
        item = Item(key, key.clone(), r.target_new, hp.radius * float(key.norm()), module)
        payloads.append(item_to_bytes(item))
    adapter = GraceAdapter(model)
    adapter.commit(list(range(1, len(payloads) + 1)), payloads)
    print(
        f"codebook: {len(adapter.codebooks[module])} entries from {len(edits)} keys at {module} "
        f"({time.perf_counter() - t0:.1f} s to capture)"
    )

    queries = [r.locality[0].prompt if r.locality else r.prompt for r in held]
    for q in queries[:2]:  # warm up both paths
        greedy_generate(model, tok, q, max_new_tokens=args.tokens)
        with adapter.active():
            greedy_generate(model, tok, q, max_new_tokens=args.tokens)
    plain: list[float] = []
    hooked: list[float] = []
    changed = 0
    for _ in range(args.rounds):
        for q in queries:
            t0 = time.perf_counter()
            a = greedy_generate(model, tok, q, max_new_tokens=args.tokens)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with adapter.active():
                b = greedy_generate(model, tok, q, max_new_tokens=args.tokens)
            hooked.append(time.perf_counter() - t0)
            changed += a != b
    mp, mh = statistics.median(plain), statistics.median(hooked)
    print(
        f"{len(queries)} out-of-scope queries x {args.rounds} rounds, {args.tokens} new tokens: "
        f"median {mp * 1000:.1f} ms without GRACE, {mh * 1000:.1f} ms with {args.entries} "
        f"entries: overhead {100 * (mh / mp - 1):+.2f}% (answers changed: {changed})"
    )


if __name__ == "__main__":
    main()
