"""Speed of the value optimisation (ROME's ``compute_v``, MEMIT's ``compute_z``) by layout.

    python benchmarks/value_passes.py --limit 20 --chunks 1,4
    python benchmarks/value_passes.py --limit 20 --chunks 1 --padded    # the layout before packing
    python benchmarks/value_passes.py --throughput    # the machine's rate, tokens per pass
    python benchmarks/value_passes.py --chunks 4,8 --value-dtypes model,bfloat16   # a bf16 copy

Optimises the values of the first ``--limit`` records of the dataset's dev split at the output
of the last MEMIT layer (the method's defaults), ``chunk`` requests per forward pass, and prints
for each chunk size the seconds per request, the mean number of passes, the seconds per pass
and request, and the mean final NLL of the new target (which should not depend on the layout).
The context prefixes are sampled once before the clock starts.

``--throughput`` instead times a forward and backward pass (gradient of the inputs only, as in
the value optimisation) through the whole model for one sequence of 16 to 450 tokens, and
prints milliseconds per pass and per token: the arithmetic floor of a value pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ZsRE")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--method", default="memit", help="whose value hyperparameters: memit, rome")
    ap.add_argument("--chunks", default="1,4", help="requests per pass, comma-separated")
    ap.add_argument("--padded", action="store_true", help="the right-padded layout")
    ap.add_argument(
        "--value-dtypes", default="model", help="ValueHparams.value_dtype values, comma-separated"
    )
    ap.add_argument("--throughput", action="store_true", help="time whole-model passes instead")
    args = ap.parse_args()
    if args.throughput:
        throughput(args.model)
        return

    import torch

    import memedit.intrinsic.values as values
    from memedit.datasets import load_requests
    from memedit.intrinsic.api import resolve_hparams
    from memedit.intrinsic.compute import block_name, mlp_out_name
    from memedit.models import load_model

    if args.padded:
        values._takes_custom_mask = lambda _model: False  # type: ignore[assignment]
    model, tok = load_model(args.model)
    requests = load_requests(args.dataset, split="dev", limit=args.limit)
    hp = resolve_hparams(args.method, {}, model)
    assert hp.layers is not None
    where = block_name if args.method != "rome" else mlp_out_name
    module = where(model, hp.layers[-1])
    prefixes = values.context_prefixes(model, tok, hp.n_prefixes, hp.prefix_tokens, hp.prefix_seed)
    print(
        f"model {args.model}; {args.dataset} dev, {len(requests)} requests; {module}; "
        f"{'padded' if args.padded else 'default'} layout; torch threads {torch.get_num_threads()}"
    )
    print()
    print(
        "| value dtype | chunk | s per request | passes per request | s per pass and request "
        "| final NLL |"
    )
    print("|---|---|---|---|---|---|")
    runs = [(d, int(c)) for d in args.value_dtypes.split(",") for c in args.chunks.split(",")]
    for value_dtype, chunk in runs:
        run_hp = dataclasses.replace(hp, value_dtype=value_dtype)
        t0 = time.perf_counter()
        found = values.optimise_values(model, tok, requests, module, prefixes, run_hp, chunk=chunk)
        secs = time.perf_counter() - t0
        steps = sum(v.steps for v in found)
        print(
            f"| {value_dtype} | {chunk} | {secs / len(found):.2f} | {steps / len(found):.1f} "
            f"| {secs / steps:.3f} | {statistics.fmean(v.nll for v in found):.3f} |",
            flush=True,
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"peak RSS {rss:.0f} MiB")


def throughput(name: str) -> None:
    import torch

    from memedit.models import load_model

    model, _tok = load_model(name)
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    print(f"model {name}; torch threads {torch.get_num_threads()}")
    print()
    print("| tokens | ms per forward + backward | ms per token |")
    print("|---|---|---|")
    for n in (16, 45, 90, 180, 450):
        ids = torch.randint(100, 20_000, (1, n), generator=gen)
        x = embed(ids).detach().requires_grad_(True)
        keep = torch.zeros(1, n, dtype=torch.bool)
        keep[0, -5:] = True  # a few scored positions, as a value pass has
        for rep in range(4):  # the first is a warm-up
            if rep == 1:
                t0 = time.perf_counter()
            logits = model(inputs_embeds=x, logits_to_keep=keep, use_cache=False).logits
            torch.autograd.grad(logits.float().logsumexp(-1).sum(), x)
        ms = (time.perf_counter() - t0) / 3 * 1000
        print(f"| {n} | {ms:.0f} | {ms / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()
