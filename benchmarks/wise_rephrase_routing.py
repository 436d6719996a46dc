"""How many of an evaluation's rephrasings reach their own WISE edit's keys (issue #5), and how
that splits between rephrasings that open with the subject and the rest.

Generalization in WISE's single-mode runs is bounded by this share: a rephrasing that reaches
no key of its edit runs on the unedited model. Routing depends on the keys alone, so the edits
are made without training (``steps=0``) through ``WiseAdapter.prepare``/``commit``, the first
``--limit`` records of ``--dataset`` dev in groups as the defaults make them.

    OMP_NUM_THREADS=1 python benchmarks/wise_rephrase_routing.py [--dataset WikiData_counterfact]
        [--limit 200] [--options "leading_subject_keys=true"]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from wise_keys_heldout import keyed_adapter  # the script beside this one

    from memedit.adapters.side_memory import standardise
    from memedit.datasets import load_requests
    from memedit.intrinsic.compute import capture, encode
    from memedit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="WikiData_counterfact")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--options", default="", help="WiseHparams as k=v;k=v")
    parser.add_argument("--show", type=int, default=5, help="missed rephrasings to print")
    args = parser.parse_args()

    model, tok = load_model()
    reqs = load_requests(args.dataset, limit=args.limit)
    t0 = time.perf_counter()
    adapter = keyed_adapter(model, tok, reqs, args.options)
    memories = list(adapter.memories.values())
    memory = memories[0]
    assert memory.norm is not None
    threshold = memory.layout.router_threshold
    counts = {"opening": [0, 0], "other": [0, 0]}
    keys = 0
    missed: list[str] = []
    for i, r in enumerate(reqs):
        item = adapter.item(i + 1)
        if not r.rephrase or item.keys is None:
            continue
        keys += item.keys.shape[0]
        text = r.rephrase[0]
        ids_t = torch.tensor([encode(tok, text)])
        acts, _ = capture(model, memory.layout.router_module, ids_t, torch.ones_like(ids_t))
        sims = standardise(acts[0, 1:], memory.norm) @ item.keys.float().T
        if item.offsets is not None:  # a key at a word fragment must match that much better
            sims = sims - item.offsets
        hit = float(sims.max()) >= threshold
        kind = "opening" if r.subject and text.startswith(r.subject) else "other"
        counts[kind][0] += 1
        counts[kind][1] += hit
        if not hit and len(missed) < args.show:
            missed.append(f"  missed: {text!r} (best cosine {float(sims.max()):.2f})")
    total = sum(n for n, _ in counts.values())
    hits = sum(h for _, h in counts.values())
    print(
        f"{args.dataset} dev 0-{len(reqs) - 1}, options {args.options or '(defaults)'}: "
        f"{keys / max(len(reqs), 1):.1f} keys per edit; rephrasings reaching their own keys "
        f"{hits}/{total} ({hits / max(total, 1):.3f}); opening with the subject "
        f"{counts['opening'][1]}/{counts['opening'][0]}, others {counts['other'][1]}/"
        f"{counts['other'][0]} ({time.perf_counter() - t0:.0f} s)"
    )
    for line in missed:
        print(line)


if __name__ == "__main__":
    main()
