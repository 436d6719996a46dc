"""Re-apply a kept sequential AlphaEdit chain (its optimised values) under other solve settings.

    OMP_NUM_THREADS=1 python benchmarks/alphaedit_replay.py --hp nullspace_threshold=0.003 \\
        --hp preserved_weight=10 --checkpoints 100,300

The chain is ``make eval-weights-sequential``'s ``weights:alphaedit`` run on ZsRE
(``docs/eval/weights-sequential-ZsRE``, batches of 100): its values are read from the run's
``values/`` (copied to a temporary folder, so nothing is added to the run), keyed as the
evaluator keyed them, with the solve-only settings (``nullspace_threshold``, ``l2_weight``,
``preserved_weight``) left at their defaults in the key: a value does not depend on them. For
the first batch the values are exact; for later ones they are the values of the default chain,
so a setting other than the default is an approximation of its own chain. Each ``--hp`` is one
row, from the unedited model; Edit Succ., rephrase and Locality (``memit_edit.score``) of every
edit so far at each checkpoint, and of the first batch. Never touches the run's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from memit_edit import _options, score

SPEC = "weights:alphaedit"
SOLVE_ONLY = ("nullspace_threshold", "l2_weight", "preserved_weight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="docs/eval/weights-sequential-ZsRE")
    ap.add_argument("--checkpoints", default="100,300,500")
    ap.add_argument("--hp", action="append", default=[], help="FIELD=VALUE[,FIELD=VALUE]")
    args = ap.parse_args()

    from memedit.datasets import load_requests
    from memedit.evaluation.runner import _run_id
    from memedit.intrinsic import AlphaEditHparams, AlphaEditState, KeyStatistics, apply_edit
    from memedit.intrinsic.api import resolve_hparams
    from memedit.intrinsic.value_cache import ValueCache, value_cache
    from memedit.metrics import predicted_tokens
    from memedit.models import load_model

    run = Path(args.run)
    manifest = json.loads((run / "manifest.json").read_text())
    alone = {
        **manifest,
        "datasets": {"ZsRE": manifest["datasets"]["ZsRE"]},
        "strategies": {SPEC: manifest["strategies"][SPEC]},
    }
    chain = _run_id(alone)  # what the evaluator keyed the chain's values with
    defaults = {f: getattr(AlphaEditHparams, f) for f in SOLVE_ONLY}
    real_key = ValueCache.key

    def key(self: ValueCache, model: Any, tok: Any, request: Any, module: str, *rest: Any) -> str:
        prefixes, hp = rest
        return real_key(
            self, model, tok, request, module, prefixes, dataclasses.replace(hp, **defaults)
        )

    ValueCache.key = key  # type: ignore[method-assign]
    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    model, tok = load_model()
    requests = load_requests("ZsRE", split="dev", limit=max(checkpoints))
    pre = []
    for r in requests:
        probes = [(p.prompt, p.answers[0]) for p in r.locality if p.answers]
        pre.append(predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes]))
    stats = KeyStatistics(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "values"
        shutil.copytree(run / "values" / "ZsRE" / "weights_alphaedit", values)
        for text in args.hp or [""]:
            hp = resolve_hparams("alphaedit", _options(text), model)
            state, deltas, t0 = AlphaEditState(), [], time.perf_counter()
            for start in range(0, max(checkpoints), 100):
                context = f"run {chain} | ZsRE | {SPEC} | after {start} cases"
                with value_cache(values, context=context) as cache:
                    batch = requests[start : start + 100]
                    deltas.append(
                        apply_edit("alphaedit", model, tok, batch, hp, stats=stats, state=state)
                    )
                if cache.misses:
                    raise SystemExit(f"{cache.misses} values of batch {start // 100 + 1} not kept")
                t = start + 100
                if t in checkpoints:
                    succ, reph, loc = score(model, tok, requests[:t], pre[:t])
                    first = score(model, tok, requests[:100], pre[:100])[0]
                    print(
                        f"{text or 'defaults'} T={t}: Edit Succ. {succ:.2f}, rephrase {reph:.2f}, "
                        f"Locality {loc:.2f}; first batch Edit Succ. {first:.2f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
            for delta in reversed(deltas):
                delta.revert()
            print(repr(state), flush=True)


if __name__ == "__main__":
    main()
