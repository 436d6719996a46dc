"""How WISE's router separates an edit's own prompts from its locality probes.

Makes the first N ZsRE dev edits one after another with ``adapter:wise`` (the options given as
a strategy spec's ``k=v;k=v``), then, with all N in memory, prints for every edit the lowest
activation score where its prompt and its rephrasing predict the target and the highest where
each locality probe predicts its answer, as multiples of the routing threshold (above 1: the
side memory answers that token), plus Rel / Gen / Loc as KnowEdit counts them (teacher-forced,
one thread). A diagnostic for tuning the router: `memedit eval` gives the figures that count.

    OMP_NUM_THREADS=1 python benchmarks/wise_routing.py --n 10 --options "act_ratio=0.8"
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _row_ratio(
    adapter: Any, tok: Any, module: str, prompt: str, answer: str, low: bool
) -> tuple[float, float]:
    """(at the prompt's last token, min (``low``) or max over the positions predicting
    ``answer``) of the activation score, / threshold."""
    from memedit.intrinsic.compute import capture, encode, pad_right

    memory = adapter.memories[module]
    full = encode(tok, f"{prompt} {answer}")
    first = max(min(len(encode(tok, prompt)), len(full)), 1)
    ids, mask = pad_right([full], 0, next(adapter.model.parameters()).device)
    acts, _ = capture(adapter.model, module, ids, mask)
    span = memory.scores(acts)[0, first - 1 : len(full) - 1]
    value = float(span.min() if low else span.max())
    return float(span[0]) / memory.threshold, value / memory.threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="edits (the first N ZsRE dev records)")
    parser.add_argument("--options", default="", help="WiseHparams as k=v;k=v")
    parser.add_argument("--debug", action="store_true", help="log each edit's training")
    args = parser.parse_args()
    if args.debug:
        import logging

        logging.basicConfig(format="%(message)s")
        logging.getLogger("memedit.adapters.wise").setLevel(logging.DEBUG)

    from memedit.adapters import WiseAdapter, WiseHparams
    from memedit.datasets import load_requests
    from memedit.evaluation.strategies import parse_strategy
    from memedit.metrics import locality_agreement, predicted_tokens, teacher_forced_accuracy
    from memedit.models import load_model

    model, tok = load_model()
    options = parse_strategy(f"adapter:wise@{args.options}").options if args.options else {}
    hp = WiseHparams(**options)
    module = hp.module_for(model)
    reqs = load_requests("ZsRE", limit=args.n)
    probes = [(p.prompt, p.answers[0] if p.answers else "") for r in reqs for p in r.locality]
    before = predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes])
    adapter = WiseAdapter(model)
    t0 = time.process_time()
    for i, r in enumerate(reqs, start=1):
        adapter.commit([i], adapter.prepare(tok, [r], hp))
    per_edit = (time.process_time() - t0) / len(reqs)

    print(f"{len(reqs)} edits, {per_edit:.1f} CPU-s per edit; score / threshold (>1: side")
    print("memory) at the prompt's last token / over the answer (rel, gen: min; loc: max)")
    print("edit |       rel |       gen | loc ...")

    def pair(v: tuple[float, float]) -> str:
        return f"{v[0]:4.2f}/{v[1]:4.2f}"

    for i, r in enumerate(reqs):
        rel = _row_ratio(adapter, tok, module, r.prompt, r.target_new, low=True)
        gen = _row_ratio(adapter, tok, module, r.rephrase[0], r.target_new, low=True)
        locs = [
            _row_ratio(adapter, tok, module, p.prompt, p.answers[0] if p.answers else "", False)
            for p in r.locality
        ]
        print(f"{i:4d} | {pair(rel)} | {pair(gen)} | " + " ".join(pair(v) for v in locs))
    with adapter.active():
        rel_acc = teacher_forced_accuracy(
            model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs]
        )
        gen_acc = teacher_forced_accuracy(
            model, tok, [r.rephrase[0] for r in reqs], [r.target_new for r in reqs]
        )
        after = predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes])
    loc = [locality_agreement(b, a) for b, a in zip(before, after, strict=True)]
    print(
        f"Rel {100 * statistics.mean(rel_acc):.2f}  Gen {100 * statistics.mean(gen_acc):.2f}  "
        f"Loc {100 * statistics.mean(loc):.2f} (per probe)"
    )


if __name__ == "__main__":
    main()
