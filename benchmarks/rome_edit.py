"""ROME on the default model, single-edit mode: edit, score, revert, for each record.

    OMP_NUM_THREADS=1 python benchmarks/rome_edit.py --limit 20
    OMP_NUM_THREADS=1 python benchmarks/rome_edit.py --limit 5 --layers 3,5,8   # layer sweep

For every record: KnowEdit's teacher-forced Edit Succ. of target_new after the prompt and after
its first rephrasing, and Locality (share of teacher-forced argmax tokens on the locality
prompts unchanged from before the edit); then the edit is reverted and the edited matrix checked
bit for bit against its original. Prints, per layer, the means ×100, seconds per edit (key
statistics and context prefixes already there — both are one-off per model), the one-off
key-statistics time for that layer (computed now, or "cached" when a file existed — pass
``--fresh-stats`` to time a computation into a temporary cache), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from typing import Any


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return 100 * statistics.fmean(vals) if vals else float("nan")


def run_layer(
    model: Any, tok: Any, requests: list[Any], layer: int, args: Any, stats: Any, notes: list[str]
) -> None:
    import torch

    from memedit.intrinsic import RomeHparams, apply_edit
    from memedit.intrinsic.compute import mlp_out_name
    from memedit.intrinsic.values import context_prefixes
    from memedit.metrics import locality_agreement, predicted_tokens, teacher_forced_accuracy

    extra = {k: float(v) for k, v in (item.split("=", 1) for item in args.hp)}
    given: dict[str, Any] = {
        "stats_tokens": args.stats_tokens,
        "n_prefixes": args.n_prefixes,
        "v_steps": args.v_steps,
        "v_lr": args.v_lr,
        "neighbour_templates": (
            None if args.neighbours is None else tuple(t for t in args.neighbours.split("|") if t)
        ),
    }
    options = {k: v for k, v in given.items() if v is not None}
    hp = RomeHparams(layers=(layer,), **options, **extra)
    start = time.perf_counter()
    loaded_before = stats.loaded
    stats.second_moment(model, tok, layer, hp.stats_tokens)
    stats_s = time.perf_counter() - start
    stats_note = (
        "cached"
        if stats.loaded > loaded_before
        else f"{stats.last_tokens} tokens in {stats_s:.1f} s"
    )
    t0 = time.perf_counter()
    notes.append(f"layer {layer}: {hp}")
    prefixes = context_prefixes(model, tok, hp.n_prefixes, hp.prefix_tokens, hp.prefix_seed)
    prefix_s = time.perf_counter() - t0
    name = mlp_out_name(model, layer) + ".weight"
    original = model.get_parameter(name).detach().clone()

    succ, reph, loc, secs, steps = [], [], [], [], []
    for r in requests:
        probes = [(p.prompt, p.answers[0]) for p in r.locality if p.answers]
        pre = predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes])
        t0 = time.perf_counter()
        delta = apply_edit("rome", model, tok, [r], hp, stats=stats)
        secs.append(time.perf_counter() - t0)
        steps.append(delta.info["value_steps"][0])
        succ += teacher_forced_accuracy(model, tok, [r.prompt], [r.target_new])
        if r.rephrase:
            reph += teacher_forced_accuracy(model, tok, [r.rephrase[0]], [r.target_new])
        if probes:
            post = predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes])
            loc.append(
                statistics.fmean(locality_agreement(a, b) for a, b in zip(pre, post, strict=True))
            )
        delta.revert()
        if not torch.equal(model.get_parameter(name), original):
            raise SystemExit(f"revert of layer {layer} was not bit-exact")
    print(
        f"| {layer} | {len(requests)} | {_mean(succ):.2f} | {_mean(reph):.2f} | {_mean(loc):.2f} "
        f"| {statistics.fmean(secs):.2f} | {statistics.median(secs):.2f} | {max(secs):.2f} "
        f"| {statistics.fmean(steps):.1f} | {stats_note} |",
        flush=True,
    )
    notes.append(f"layer {layer}: context prefixes sampled in {prefix_s:.2f} s: {prefixes!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ZsRE")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--layers", default=None, help="comma-separated (default: the model's)")
    ap.add_argument("--stats-tokens", type=int, default=None, help="default: RomeHparams'")
    ap.add_argument("--n-prefixes", type=int, default=None)
    ap.add_argument("--v-steps", type=int, default=None)
    ap.add_argument("--v-lr", type=float, default=None)
    ap.add_argument("--hp", action="append", default=[], help="RomeHparams FIELD=NUMBER")
    ap.add_argument("--split", default="dev", help="dev, or train (to tune without dev)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many records first")
    ap.add_argument(
        "--neighbours",
        default=None,
        help="neighbour KL templates, '|'-separated ({} = subject); '' = none",
    )
    ap.add_argument("--fresh-stats", action="store_true", help="time statistics in a temp cache")
    ap.add_argument(
        "--padded",
        action="store_true",
        help="value passes in the right-padded layout (as before packing), for comparison",
    )
    ap.add_argument(
        "--dense-passes",
        action="store_true",
        help="value passes with dense attention and every block run (as before row attention "
        "and kept lower blocks), for comparison",
    )
    args = ap.parse_args()
    if args.padded:
        import memedit.intrinsic.values as values

        values._takes_custom_mask = lambda _model: False  # type: ignore[assignment]
    if args.dense_passes:
        from _passes import use_dense_passes

        use_dense_passes()

    import torch

    from memedit.datasets import load_requests
    from memedit.intrinsic import KeyStatistics
    from memedit.intrinsic.hparams import default_layers
    from memedit.models import load_model

    model, tok = load_model(args.model)
    requests = load_requests(args.dataset, split=args.split, limit=args.offset + args.limit)
    requests = requests[args.offset :]
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else list(default_layers(model, "rome"))
    )
    tmp = tempfile.TemporaryDirectory() if args.fresh_stats else None
    stats = KeyStatistics(root=tmp.name if tmp else None, progress=False)
    print(
        f"model {args.model}; {args.dataset} {args.split}, "
        f"{len(requests)} requests from #{args.offset}; "
        f"torch threads {torch.get_num_threads()}; statistics: {stats.source.identity}, "
        "hyperparameters: RomeHparams defaults, overridden by the options given (see below)"
    )
    print()
    print(
        "| layer | n | Edit Succ. | rephrase | Locality | s/edit mean | median | max "
        "| value passes | key statistics (one-off) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    for layer in layers:
        run_layer(model, tok, requests, layer, args, stats, notes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    for note in notes:
        print(note)
    print(f"peak RSS {rss:.0f} MiB")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
