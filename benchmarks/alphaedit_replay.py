"""Re-apply a kept sequential AlphaEdit chain (its optimised values) under other solve settings.

    OMP_NUM_THREADS=1 python benchmarks/alphaedit_replay.py --hp nullspace_threshold=0.003 \\
        --hp preserved_weight=10 --checkpoints 100,300

The chain is one of ``make eval-weights-sequential``'s AlphaEdit runs on ZsRE
(``docs/eval/weights-sequential-ZsRE``, batches of 100; ``--spec`` names it, default
``weights:alphaedit``): its values are read from the run's ``values/`` (copied to a temporary
folder, so nothing is added to the run), keyed as the evaluator keyed them, with the solve-only
settings (``nullspace_threshold``, ``l2_weight``, ``preserved_weight``, and the layers below the
top one) set to the chain's own in the key: a value does not depend on them. Each ``--hp`` is
one row, the chain's options with the row's on top, from the unedited model. For the first
batch the values are exact; for later ones they are the values of the chain, so a row that
changes a solve setting is an approximation of its own chain. Edit Succ., rephrase and Locality
(``memit_edit.score``) of every edit so far at each checkpoint, and of the first batch. Never
touches the run's files.
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

from memit_edit import _options, locality_tokens, score

SOLVE_ONLY = (
    "nullspace_threshold",
    "l2_weight",
    "preserved_weight",
    "general_weight",
    "layers",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="docs/eval/weights-sequential-ZsRE")
    ap.add_argument("--spec", default="weights:alphaedit", help="the chain whose values to use")
    ap.add_argument("--checkpoints", default="100,300,500")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="re-apply in batches of this size (a divisor of 100); each takes the values the "
        "chain optimised for its batch of 100, an approximation below 100",
    )
    ap.add_argument(
        "--facts",
        action="store_true",
        help="key statistics from WikiBio followed by fact statements built from the train "
        "files' Relation_Specificity probes (WikiData_recent, WikiData_counterfact)",
    )
    ap.add_argument(
        "--unedited",
        type=int,
        default=0,
        help="also score the Locality probes of this many records after the last checkpoint, "
        "whose subjects are never edited: what the edits move beyond their own subjects",
    )
    ap.add_argument("--hp", action="append", default=[], help="FIELD=VALUE[,FIELD=VALUE]")
    args = ap.parse_args()

    from memedit.datasets import load_requests
    from memedit.evaluation.runner import _run_id, safe_name
    from memedit.intrinsic import AlphaEditState, KeyStatistics, apply_edit
    from memedit.intrinsic.api import resolve_hparams
    from memedit.intrinsic.value_cache import ValueCache, value_cache
    from memedit.models import load_model

    run, spec = Path(args.run), args.spec
    manifest = json.loads((run / "manifest.json").read_text())
    alone = {
        **manifest,
        "datasets": {"ZsRE": manifest["datasets"]["ZsRE"]},
        "strategies": {spec: manifest["strategies"][spec]},
    }
    chain = _run_id(alone)  # what the evaluator keyed the chain's values with
    model, tok = load_model()
    chain_options = manifest["strategies"][spec]["options"]
    chain_hp = resolve_hparams("alphaedit", chain_options, model)
    own = {f: getattr(chain_hp, f) for f in SOLVE_ONLY}
    real_key = ValueCache.key

    def key(self: ValueCache, model: Any, tok: Any, request: Any, module: str, *rest: Any) -> str:
        prefixes, hp = rest
        return real_key(self, model, tok, request, module, prefixes, dataclasses.replace(hp, **own))

    ValueCache.key = key  # type: ignore[method-assign]
    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    if args.batch_size < 1 or 100 % args.batch_size:
        raise SystemExit(f"--batch-size must divide 100, got {args.batch_size}")
    last = max(checkpoints)
    requests = load_requests("ZsRE", split="dev", limit=last + args.unedited)
    pre = [locality_tokens(model, tok, r) for r in requests]
    stats = KeyStatistics(_facts_source() if args.facts else None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "values"
        shutil.copytree(run / "values" / "ZsRE" / safe_name(spec), values)
        for text in args.hp or [""]:
            hp = resolve_hparams("alphaedit", {**chain_options, **_options(text)}, model)
            if hp.layers[-1] != chain_hp.layers[-1]:  # type: ignore[index]
                raise SystemExit(f"{text}: the values were optimised at layer {chain_hp.layers}")
            state, deltas, t0 = AlphaEditState(), [], time.perf_counter()
            size = args.batch_size
            for start in range(0, last, size):
                kept = start - start % 100  # the chain's values came in batches of 100
                context = f"run {chain} | ZsRE | {spec} | after {kept} cases"
                with value_cache(values, context=context) as cache:
                    batch = requests[start : start + size]
                    deltas.append(
                        apply_edit("alphaedit", model, tok, batch, hp, stats=stats, state=state)
                    )
                if cache.misses:
                    raise SystemExit(f"{cache.misses} values of the edits from {start} not kept")
                t = start + size
                if t in checkpoints:
                    succ, reph, loc = score(model, tok, requests[:t], pre[:t])
                    first = score(model, tok, requests[:100], pre[:100])[0]
                    other = ""
                    if args.unedited:
                        away = score(model, tok, requests[last:], pre[last:])[2]
                        other = f", Locality of {args.unedited} unedited subjects {away:.2f}"
                    print(
                        f"{text or 'defaults'} T={t}: Edit Succ. {succ:.2f}, rephrase {reph:.2f}, "
                        f"Locality {loc:.2f}; first batch Edit Succ. {first:.2f}{other} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
            for delta in reversed(deltas):
                delta.revert()
            print(repr(state), flush=True)


def _facts_source() -> Any:
    """WikiBio's passages, then statements ``probe + " " + answer + "."`` from the train
    files' locality probes, ten to a text."""
    from memedit.datasets import resolve_dataset_file
    from memedit.intrinsic.stats import ChainedText, TextList, WikiBioPassages

    facts = []
    for name in ("WikiData_recent", "WikiData_counterfact"):
        path = resolve_dataset_file(name, "train")
        for record in json.loads(path.read_text()):
            for probes in record.get("locality", {}).values():
                for probe in probes:
                    answers = probe.get("ground_truth") or []
                    first = answers[0] if answers else None
                    if isinstance(first, list):
                        first = first[0] if first else None
                    if first:
                        facts.append(f"{probe['prompt']} {first}.")
    texts = tuple(" ".join(facts[i : i + 10]) for i in range(0, len(facts), 10))
    return ChainedText(WikiBioPassages(), TextList(texts, name="train-facts"))


if __name__ == "__main__":
    main()
