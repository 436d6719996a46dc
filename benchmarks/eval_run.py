"""Throughput and peak memory of a KnowEdit evaluation run (the memory strategy by default).

    python benchmarks/eval_run.py --dataset ZsRE --limit 50 [--strategies memory] [--workers 1]

Prints wall time, records/s per strategy (from the run's own timings: edit + scoring per
record, pre-edit pass excluded) and overall, and the peak RSS of this process and its workers.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ZsRE")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--strategies", default="memory")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-generation", action="store_true")
    args = ap.parse_args()

    from memedit.evaluation import EvalConfig, EvalOptions, run_eval, write_reports
    from memedit.evaluation.report import load_records, summarise

    out = tempfile.mkdtemp(prefix="bench-eval-")
    config = EvalConfig(
        datasets=(args.dataset,),
        strategies=tuple(args.strategies.split(",")),
        limit=args.limit,
        out=out,
        workers=args.workers,
        options=EvalOptions(generation=not args.no_generation),
    )
    t0 = time.perf_counter()
    run_eval(config, progress=False)
    wall = time.perf_counter() - t0
    write_reports(out)
    summary = summarise(load_records(__import__("pathlib").Path(out)))[args.dataset]["single"]
    n = sum(v["n"] for v in summary.values())
    print(
        f"{args.dataset}, {args.limit} records, strategies {args.strategies}, "
        f"workers {args.workers}, generation judging {not args.no_generation}"
    )
    for s, v in summary.items():
        print(f"  {s}: {v['records_per_s']} records/s (edit + scoring), n={v['n']}")
    print(
        f"wall {wall:.1f} s for {n} strategy-records incl. model load and pre-edit pass: "
        f"{n / wall:.3f} records/s overall"
    )
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        f"peak RSS: this process {self_kb / 1024:.0f} MiB; largest worker {kids_kb / 1024:.0f} MiB"
    )
    print(f"output: {out}")


if __name__ == "__main__":
    main()
