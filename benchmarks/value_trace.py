"""How a value optimisation converges: the target NLL after every pass, per request.

    python benchmarks/value_trace.py --limit 24 --hp value_dtype=bfloat16,n_prefixes=2
    python benchmarks/value_trace.py --limit 24 --hp value_dtype=bfloat16,n_prefixes=2 --beta2 0.9

Optimises the values of the first ``--limit`` records of the dataset's dev split at the output
of the last MEMIT layer (MEMIT's defaults, overridden by ``--hp FIELD=VALUE[,FIELD=VALUE]``)
and prints the seconds, the mean number of passes and their histogram, each request's
‖target − init‖ / ‖init‖ (the norm clamp binds at ``clamp_norm_factor``) and the NLL trace
of the first ``--show`` requests. ``--beta2`` replaces Adam's second-moment decay (0.999) for
the run, to test whether the slow final approach to the NLL stop is Adam's memory of the
early, large gradients. ``--chunk`` sets the requests per pass (default: the CPU's).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import re
import time

from memit_edit import _options


class _Trace(logging.Handler):
    """Collects the NLL of every logged value step, by request."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.nll: dict[int, list[float]] = collections.defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"value (\d+) step \d+: loss \S+ nll (\S+)", record.getMessage())
        if m:
            self.nll[int(m.group(1))].append(float(m.group(2)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ZsRE")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--hp", default="", help="FIELD=VALUE[,FIELD=VALUE] over MEMIT's defaults")
    ap.add_argument("--beta2", type=float, default=None, help="Adam's beta2 for the run")
    ap.add_argument("--show", type=int, default=8, help="requests whose NLL trace is printed")
    ap.add_argument("--chunk", type=int, default=None, help="requests per pass (default: CPU's)")
    args = ap.parse_args()

    import torch

    import memedit.intrinsic.values as values
    from memedit.datasets import load_requests
    from memedit.intrinsic.api import resolve_hparams
    from memedit.intrinsic.compute import block_name
    from memedit.models import load_model

    model, tok = load_model(args.model)
    requests = load_requests(args.dataset, split="dev", limit=args.limit)
    hp = resolve_hparams("memit", {}, model)
    hp = dataclasses.replace(hp, **_options(args.hp))
    assert hp.layers is not None
    module = block_name(model, hp.layers[-1])
    prefixes = values.context_prefixes(model, tok, hp.n_prefixes, hp.prefix_tokens, hp.prefix_seed)
    if args.beta2 is not None:
        torch.optim.Adam = functools.partial(torch.optim.Adam, betas=(0.9, args.beta2))  # type: ignore[misc]
    trace = _Trace()
    log = logging.getLogger(values.__name__)
    log.setLevel(logging.DEBUG)
    log.addHandler(trace)
    t0 = time.perf_counter()
    found = values.optimise_values(model, tok, requests, module, prefixes, hp, chunk=args.chunk)
    secs = time.perf_counter() - t0
    steps = [v.steps for v in found]
    print(
        f"model {args.model}; {args.dataset} dev, {len(found)} requests; {module}; {args.hp}; "
        f"chunk {args.chunk or values.CPU_VALUE_CHUNK}"
    )
    print(
        f"beta2 {args.beta2 or 0.999}; {secs:.1f} s; {sum(steps) / len(steps):.1f} passes per value"
    )
    print("passes histogram:", dict(sorted(collections.Counter(steps).items())))
    ratios = [float((v.target - v.init).norm() / v.init.norm()) for v in found]
    shown = " ".join(f"{r:.2f}" for r in ratios)
    print(f"||delta|| / ||init||: {shown} (clamp {hp.clamp_norm_factor})")
    for i in range(min(args.show, len(found))):
        print(f"request {i}: NLL {' '.join(f'{x:.2f}' for x in trace.nll[i])}")


if __name__ == "__main__":
    main()
