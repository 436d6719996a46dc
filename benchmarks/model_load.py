"""Model loading figures for a catalogue model (default: smollm2-135m).

Prints: first pull + convert time (into a fresh temporary cache), cached load time in a
fresh process, peak RSS of each process, and the time of a 20-token greedy generation.
Every step runs in its own Python process so that RSS and timings are not shared.

    python benchmarks/model_load.py [--model NAME] [--repeats 3] [--threads N]

``--threads`` sets torch's intra-op threads in the child processes (default: torch's own
choice). On a shared, oversubscribed CPU one thread can be many times faster than two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

PROMPT = "The capital of France is"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_pull(model: str) -> dict[str, float]:
    t0 = time.perf_counter()
    from memedit.models import pull

    t1 = time.perf_counter()
    pull(model, progress=False)
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "pull_convert_s": t2 - t1, "peak_rss_mb": _peak_rss_mb()}


def step_load(model: str, threads: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)

    from memedit.models import load_model

    t1 = time.perf_counter()
    m, tok = load_model(model)
    t2 = time.perf_counter()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        m.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
        t3 = time.perf_counter()
        out = m.generate(**ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        t4 = time.perf_counter()
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    return {
        "import_s": t1 - t0,
        "cached_load_s": t2 - t1,
        "generate_20_s": t4 - t3,
        "new_tokens": float(n_new),
        "peak_rss_mb": _peak_rss_mb(),
        "answer": tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True),
    }


def _child(step: str, model: str, cache: str | None, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    if cache is not None:
        env["MEMEDIT_CACHE"] = cache
    cmd = [sys.executable, __file__, "--step", step, "--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--step", choices=["pull", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        result = (
            step_pull(args.model) if args.step == "pull" else step_load(args.model, args.threads)
        )
        print(json.dumps(result))
        return

    import torch

    print(
        f"torch threads: {args.threads or torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="memedit-bench-") as cache:
        first = _child("pull", args.model, cache, args.threads)
        print(
            f"first pull+convert ({args.model}, fresh cache): {first['pull_convert_s']:.1f} s, "
            f"peak RSS {first['peak_rss_mb']:.0f} MB (import {first['import_s']:.2f} s)"
        )
        loads = [_child("load", args.model, cache, args.threads) for _ in range(args.repeats)]
    for i, r in enumerate(loads, 1):
        print(
            f"  run {i}: import {r['import_s']:.1f} s, cached load {r['cached_load_s']:.2f} s, "
            f"20 tokens {r['generate_20_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    med = {k: statistics.median(r[k] for r in loads) for k in loads[0] if k != "answer"}
    print(
        f"cached load in a fresh process (median of {len(loads)}): {med['cached_load_s']:.2f} s "
        f"(+ {med['import_s']:.1f} s importing torch/transformers), "
        f"peak RSS {med['peak_rss_mb']:.0f} MB"
    )
    print(
        f"20-token greedy generation (median): {med['generate_20_s']:.2f} s "
        f"({int(med['new_tokens'])} tokens); answer: {loads[0]['answer']!r}"
    )


if __name__ == "__main__":
    main()
