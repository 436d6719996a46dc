"""Evaluate the memory strategy on a few real KnowEdit records and print the table.

    python examples/knowedit_eval.py --dataset ZsRE --limit 3

The same evaluator as `memedit eval` (Edit Succ., Portability, Locality, Fluency), here on
the default model against the unedited model, with the generation-based judging and
Fluency switched off to keep it quick.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from memedit import EditableModel
from memedit.evaluation import EvalConfig, EvalOptions, evaluate, write_reports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="ZsRE")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--out", default=None, help="output directory (default: a fresh one)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="memedit-knowedit-"))
    config = EvalConfig(
        datasets=(args.dataset,),
        strategies=("unedited", "memory"),
        limit=args.limit,
        out=str(out),
        options=EvalOptions(fluency_tokens=0, generation=False),
    )
    with EditableModel.load(progress=False) as em:
        evaluate(em, config, progress=False)
    print(write_reports(out)["md"].read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
