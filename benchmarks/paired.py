"""Two evaluation runs compared record by record (the same dataset's records, matched by index).

    python benchmarks/paired.py docs/eval/weights-memit-ZsRE /tmp/bare-ZsRE
    python benchmarks/paired.py A B --strategy-a weights:memit --strategy-b "weights:memit@x=1"

Reads each run directory's ``records/<dataset>/*.jsonl`` (``memedit eval --out``), keeps the
records present in both, and prints per metric the mean of A, the mean of B and B − A with its
standard error over the records (×100; Fluency as it is). A record's Portability and Locality
are the means of its probe kinds (``portability/*``, ``locality/*``), as the evaluator's
summary takes them. When a directory holds several strategies' records, ``--strategy-a`` /
``--strategy-b`` pick one (by the ``strategy`` field).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

METRICS = ("edit_succ", "rephrase", "portability", "locality", "fluency")


def load(run: Path, strategy: str | None) -> dict[tuple[object, ...], dict[str, float]]:
    """``(dataset, mode, T, index) -> metrics`` of the run's scored records (of ``strategy``,
    if given); Portability and Locality per record as the evaluator's summary takes them."""
    from memedit.evaluation.report import aggregate, load_records

    lines = load_records(run)
    if not lines:
        raise SystemExit(f"{run}: no records/<dataset>/*.jsonl")
    found: dict[tuple[object, ...], dict[str, float]] = {}
    for rec in lines:
        if "metrics" not in rec or (strategy is not None and rec.get("strategy") != strategy):
            continue
        values = {name: aggregate([rec["metrics"]], name) for name in METRICS}
        key = (rec["dataset"], rec["mode"], rec.get("T", 0), int(rec["index"]))
        found[key] = {name: v for name, v in values.items() if not math.isnan(v)}
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--strategy-a", default=None)
    ap.add_argument("--strategy-b", default=None)
    args = ap.parse_args()
    a, b = load(args.a, args.strategy_a), load(args.b, args.strategy_b)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise SystemExit("the two runs have no record in common")
    print(f"A: {args.a}  B: {args.b}  records in both: {len(shared)}")
    print("| metric | A | B | B − A | ± s.e. | n |")
    print("|---|---|---|---|---|---|")
    for name in METRICS:
        pairs = [(a[k][name], b[k][name]) for k in shared if name in a[k] and name in b[k]]
        if not pairs:
            continue
        scale = 1.0 if name == "fluency" else 100.0
        diffs = [scale * (y - x) for x, y in pairs]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        mean_a = scale * statistics.fmean(x for x, _ in pairs)
        mean_b = scale * statistics.fmean(y for _, y in pairs)
        print(
            f"| {name} | {mean_a:.2f} | {mean_b:.2f} | {statistics.fmean(diffs):+.2f} | "
            f"{se:.2f} | {len(pairs)} |"
        )


if __name__ == "__main__":
    main()
