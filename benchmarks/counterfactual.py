"""Counterfactual path alone (no retrieval, no scope classifier): each record's edit is placed
in context and its prompt and first rephrasing are scored with KnowEdit's teacher-forced token
accuracy of target_new, for `TemplatePath` (context only) and the trained adapter path.

    python benchmarks/counterfactual.py --limit 200
    python benchmarks/counterfactual.py --limit 200 --adapter path/to/counterfactual-x.json

"+2 distractors": two other records' edits are in context too (the true edit first, second
or third in turn), as when the router passes several candidate edits.
Prints a Markdown table (accuracy ×100). ``--misrouted`` measures instead what a scope
classifier's false positive costs: each record's first locality prompt answered through the
path with that record's edit in context, scored as KnowEdit Locality against the bare model.
``--adapter-only`` skips the template-qa rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any


def _contexts(reqs: Sequence[Any], distractors: int) -> list[list[Any]]:
    n = len(reqs)
    out = []
    for i, r in enumerate(reqs):
        others = [reqs[(i + k) % n] for k in range(1, distractors + 1)]
        pos = i % (distractors + 1)
        out.append([*others[:pos], r, *others[pos:]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--datasets", nargs="+", default=["ZsRE", "WikiData_counterfact"])
    ap.add_argument("--adapter", default=None, help="adapter metadata JSON (default: matching)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--misrouted",
        action="store_true",
        help="instead: locality when a record's locality prompt is wrongly routed in scope",
    )
    ap.add_argument(
        "--adapter-only", action="store_true", help="skip the template-qa rows (faster)"
    )
    args = ap.parse_args()

    from memedit.counterfactual import TemplatePath, find_adapter, load_adapter_path
    from memedit.datasets import load_requests
    from memedit.metrics import locality_agreement, predicted_tokens, teacher_forced_accuracy
    from memedit.models import load_model

    model, tok = load_model(args.model)
    found = args.adapter or find_adapter(model)
    paths: list[Any] = [] if args.adapter_only and found else [TemplatePath()]
    if found:
        paths.append(load_adapter_path(found))
    print(f"model {args.model or 'smollm2-135m'}; adapter {found}")
    print()

    def score(prompts: list[str], targets: list[str], path: Any) -> float:
        with path.activate(model):
            vals = teacher_forced_accuracy(model, tok, prompts, targets, batch_size=args.batch_size)
        return 100 * statistics.fmean(vals)

    if args.misrouted:
        print("| dataset | n | path | Locality when misrouted (edit in context) | seconds |")
        print("|---|---|---|---|---|")
        for ds in args.datasets:
            reqs = load_requests(ds, limit=args.limit)
            pairs = [(r, p) for r in reqs for p in r.locality[:1] if p.answers]
            answers = [p.answers[0] for _, p in pairs]
            bs = args.batch_size
            bare = [p.prompt for _, p in pairs]
            base = predicted_tokens(model, tok, bare, answers, batch_size=bs)
            for path in paths:
                t0 = time.perf_counter()
                prompts = [path.build_input(p.prompt, [r], tok) for r, p in pairs]
                with path.activate(model):
                    post = predicted_tokens(model, tok, prompts, answers, batch_size=bs)
                agree = [locality_agreement(a, b) for a, b in zip(base, post, strict=True)]
                s = time.perf_counter() - t0
                loc = 100 * statistics.fmean(agree)
                print(f"| {ds} | {len(pairs)} | {path.name} | {loc:.2f} | {s:.0f} |")
        return
    print("| dataset | n | path | context | edit prompt | rephrase | seconds |")
    print("|---|---|---|---|---|---|---|")
    for ds in args.datasets:
        reqs = load_requests(ds, limit=args.limit)
        reph = [i for i, r in enumerate(reqs) if r.rephrase]
        pre_e = score([r.prompt for r in reqs], [r.target_new for r in reqs], TemplatePath())
        pre_r = score(
            [reqs[i].rephrase[0] for i in reph], [reqs[i].target_new for i in reph], TemplatePath()
        )
        print(f"| {ds} | {len(reqs)} | unedited | none | {pre_e:.2f} | {pre_r:.2f} | |")
        for path in paths:
            for distractors in (0, 2):
                t0 = time.perf_counter()
                ctx = _contexts(reqs, distractors)
                targets = [r.target_new for r in reqs]
                edit_p = [
                    path.build_input(r.prompt, c, tok) for r, c in zip(reqs, ctx, strict=True)
                ]
                reph_p = [path.build_input(reqs[i].rephrase[0], ctx[i], tok) for i in reph]
                e = score(edit_p, targets, path)
                rp = score(reph_p, [targets[i] for i in reph], path)
                what = "edit" if distractors == 0 else f"edit +{distractors} distractors"
                s = time.perf_counter() - t0
                print(
                    f"| {ds} | {len(reqs)} | {path.name} | {what} | {e:.2f} | {rp:.2f} | {s:.0f} |"
                )


if __name__ == "__main__":
    main()
