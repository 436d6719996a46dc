"""MEMIT / AlphaEdit on the default model, batch mode: edit N records at once, score, revert.

    OMP_NUM_THREADS=1 python benchmarks/memit_edit.py --limit 20
    OMP_NUM_THREADS=1 python benchmarks/memit_edit.py --limit 20 --methods memit \\
        --hp mom2_update_weight=5000 --hp mom2_update_weight=15000        # a sweep, one row each
    OMP_NUM_THREADS=1 python benchmarks/memit_edit.py --limit 100 --batch-size 20   # sequential

The first ``--limit`` records of the dataset's dev split are edited in batches of
``--batch-size`` (default: all in one), one after another on the same model (AlphaEdit carries
its :class:`~memedit.intrinsic.AlphaEditState` from batch to batch). Then, for every record:
KnowEdit's teacher-forced Edit Succ. of target_new after the prompt and after its first
rephrasing, and Locality (share of teacher-forced argmax tokens on the locality prompts
unchanged from before the edits). Then the deltas are reverted (newest first) and every edited
matrix checked bit for bit. Each ``--hp`` is one row (``FIELD=VALUE[,FIELD=VALUE]``); each row
starts from the unedited model. Prints the means ×100, the unedited model's scores, seconds per
batch (key statistics already computed — they are one-off per model and layer: the one-off
time is printed), the mean target-value NLL and passes per value, the residual norms, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return 100 * statistics.fmean(vals) if vals else float("nan")


def _options(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        out[key] = {"true": True, "false": False}.get(value.lower(), value)  # 3:4:5 stays a text
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
    return out


def locality_tokens(model: Any, tok: Any, request: Any) -> list[list[int]]:
    """The teacher-forced predicted tokens of ``request``'s locality probes (first answers)."""
    from memedit.metrics import predicted_tokens

    probes = [(p.prompt, p.answers[0]) for p in request.locality if p.answers]
    return predicted_tokens(model, tok, [p for p, _ in probes], [a for _, a in probes])


def score(model: Any, tok: Any, requests: list[Any], pre: list[list[list[int]]]) -> list[float]:
    """Edit Succ., rephrase and Locality means (×100) of ``requests`` on ``model`` now;
    ``pre[i]``: the unedited predicted tokens of request i's locality probes."""
    from memedit.metrics import locality_agreement, teacher_forced_accuracy

    prompts = [r.prompt for r in requests]
    succ = teacher_forced_accuracy(model, tok, prompts, [r.target_new for r in requests])
    phrased = [r for r in requests if r.rephrase]
    reph = teacher_forced_accuracy(
        model, tok, [r.rephrase[0] for r in phrased], [r.target_new for r in phrased]
    )
    loc = []
    for r, before in zip(requests, pre, strict=True):
        if any(p.answers for p in r.locality):
            post = locality_tokens(model, tok, r)
            loc.append(
                statistics.fmean(
                    locality_agreement(a, b) for a, b in zip(before, post, strict=True)
                )
            )
    return [_mean(succ), _mean(reph), _mean(loc)]


def run(
    method: str, options: dict[str, Any], model: Any, tok: Any, requests: list[Any], args: Any
) -> str:
    import torch

    from memedit.intrinsic import AlphaEditState, apply_edit
    from memedit.intrinsic.api import resolve_hparams

    hp = resolve_hparams(method, {"stats_tokens": args.stats_tokens, **options}, model)
    state = AlphaEditState() if method == "alphaedit" else None
    deltas, secs, nll, steps, resid = [], [], [], [], []
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start : start + args.batch_size]
        t0 = time.perf_counter()
        delta = apply_edit(method, model, tok, batch, hp, stats=args.stats, state=state)
        secs.append(time.perf_counter() - t0)
        deltas.append(delta)
        nll += delta.info["value_nll"]
        steps += delta.info["value_steps"]
        resid.append(delta.info["residual_norm"])
    succ, reph, loc = score(model, tok, requests, args.pre)
    originals: dict[str, Any] = {}
    for d in deltas:  # the first delta to touch a tensor holds its true original
        for name in d.names:
            originals.setdefault(name, d.original(name).clone())
    for delta in reversed(deltas):
        delta.revert()
    for name, original in originals.items():
        if not torch.equal(model.get_parameter(name), original):
            raise SystemExit(f"revert of {name} was not bit-exact")
    first = [r[0] for r in resid]
    last = [r[-1] for r in resid]
    opts = ",".join(
        f"{k}={len(hp.neighbour_templates)} templates" if k == "neighbour_templates" else f"{k}={v}"
        for k, v in options.items()
    )
    opts = opts or "defaults"
    return (
        f"| {method} | {opts} | {','.join(map(str, hp.layers))} | {len(requests)} "
        f"| {args.batch_size} | {succ:.2f} | {reph:.2f} | {loc:.2f} "
        f"| {statistics.fmean(secs):.1f} | {statistics.fmean(nll):.3f} "
        f"| {statistics.fmean(steps):.1f} "
        f"| {statistics.fmean(first):.2f} → {statistics.fmean(last):.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ZsRE")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default: all in one batch")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument(
        "--neighbours",
        type=float,
        default=None,
        help="weight of the neighbour prompts in the value loss (default: the method's; 0: none)",
    )
    ap.add_argument("--split", default="dev", help="dev, or train")
    ap.add_argument("--offset", type=int, default=0, help="skip this many records first (tuning)")
    ap.add_argument(
        "--neighbour-templates",
        default=None,
        help="value-loss neighbour prompts, '|'-separated, each with one {} for the subject",
    )
    ap.add_argument("--value-chunk", type=int, default=None, help="requests per value pass")
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
    ap.add_argument(
        "--hp", action="append", default=[], help="FIELD=VALUE[,FIELD=VALUE] (one row each)"
    )
    args = ap.parse_args()

    import torch

    from memedit.datasets import load_requests
    from memedit.intrinsic import KeyStatistics
    from memedit.intrinsic.api import resolve_hparams
    from memedit.models import load_model

    model, tok = load_model(args.model)
    requests = load_requests(args.dataset, split=args.split, limit=args.offset + args.limit)
    requests = requests[args.offset :]
    args.batch_size = args.batch_size or len(requests)
    args.stats = KeyStatistics(progress=False)
    args.pre = [locality_tokens(model, tok, r) for r in requests]
    methods = args.methods.split(",")
    import memedit.intrinsic.memit as memit_module
    import memedit.intrinsic.values as values

    if args.padded:
        values._takes_custom_mask = lambda _model: False  # type: ignore[assignment]
    if args.dense_passes:
        from _passes import use_dense_passes

        use_dense_passes()
    if args.value_chunk:  # the default on a CPU is values.CPU_VALUE_CHUNK requests per pass
        real = values.optimise_values

        def chunked(*a: Any, **k: Any) -> Any:
            return real(*a, **{**k, "chunk": args.value_chunk})

        values.optimise_values = chunked
        memit_module.optimise_values = chunked
    extra: dict[str, Any] = {}
    if args.neighbours is not None:
        extra = {"neighbour_factor": args.neighbours}
    if args.neighbour_templates is not None:
        extra["neighbour_templates"] = tuple(args.neighbour_templates.split("|"))
    rows = [(m, {**extra, **_options(h)}) for h in (args.hp or [""]) for m in methods]
    layers = sorted({x for m, o in rows for x in resolve_hparams(m, o, model).layers})
    t0 = time.perf_counter()
    for layer in layers:
        args.stats.second_moment(model, tok, layer, args.stats_tokens)
    stats_s = time.perf_counter() - t0
    unedited = score(model, tok, requests, args.pre)
    print(
        f"model {args.model}; {args.dataset} {args.split}, {len(requests)} requests from "
        f"#{args.offset}; torch threads "
        f"{torch.get_num_threads()}; statistics {args.stats.source.identity}, up to "
        f"{args.stats_tokens} tokens, layers {layers}: {args.stats.computed} computed, "
        f"{args.stats.loaded} loaded in {stats_s:.1f} s"
    )
    print(
        f"unedited: Edit Succ. {unedited[0]:.2f}, rephrase {unedited[1]:.2f}, "
        f"Locality {unedited[2]:.2f}"
    )
    print()
    print(
        "| method | options | layers | n | batch | Edit Succ. | rephrase | Locality "
        "| s/batch | value NLL | value passes | residual first → last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, options in rows:
        print(run(method, options, model, tok, requests, args), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
