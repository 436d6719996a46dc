"""Key statistics from 10^5 tokens of offline text for one layer of the default model (issue #4:
"covariance statistics for one layer from 10^5 tokens ≤ 5 min" on the 2-core CPU).

    OMP_NUM_THREADS=1 python benchmarks/key_stats.py                  # 100,000 tokens, layer 5
    python benchmarks/key_stats.py --tokens 200000 --layer 8 --threads 2
    python benchmarks/key_stats.py --tokens 3000 --no-wikibio --layer 1   # smoke run

The text is KnowEdit's WikiBio passages (67,811 SmolLM2 tokens) followed by text sampled from
the model itself (``ModelSampledText``): as many texts of ``--tokens-per-text`` new tokens as
the tokens beyond WikiBio need. Times (a) sampling that text (``--batch-size`` texts per
``generate`` call, KV cache) and (b) computing ``E[k kᵀ]`` of the layer's keys over the chained
text into a temporary cache directory (so it is computed, never loaded). Prints seconds for
each, the tokens used, the process's peak RSS, the 1-minute load average (other jobs share the
CPU) and the date.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens for the statistics")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--tokens-per-text", type=int, default=256, help="new tokens per sample")
    ap.add_argument("--batch-size", type=int, default=64, help="texts sampled per batch")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--no-wikibio", action="store_true", help="sampled text only")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from memedit.intrinsic import ChainedText, KeyStatistics, ModelSampledText, WikiBioPassages
    from memedit.intrinsic.compute import encode, mlp_out_name
    from memedit.intrinsic.stats import TextSource
    from memedit.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    module = mlp_out_name(model, args.layer)
    print(
        f"model {args.model} ({next(model.parameters()).dtype}), layer {args.layer} ({module}), "
        f"torch threads {torch.get_num_threads()}, loaded in {load_s:.1f} s"
    )

    parts: list[TextSource] = []
    wiki_tokens = 0
    if not args.no_wikibio:
        wiki = WikiBioPassages()
        t0 = time.perf_counter()
        wiki_tokens = sum(len(encode(tok, text)) for text in wiki.texts())
        count_s = time.perf_counter() - t0
        parts.append(wiki)
        print(f"WikiBio passages: {wiki_tokens} tokens (counted in {count_s:.1f} s)")
    wanted = max(0, args.tokens - wiki_tokens)
    n_texts = math.ceil(wanted / args.tokens_per_text)
    sample_s = 0.0
    if n_texts:
        sampled = ModelSampledText(
            model,
            tok,
            n_texts=n_texts,
            tokens_per_text=args.tokens_per_text,
            seed=args.seed,
            top_k=args.top_k,
            batch_size=args.batch_size,
            progress=args.progress,
        )
        t0 = time.perf_counter()
        texts = list(sampled.texts())
        sample_s = time.perf_counter() - t0
        generated = n_texts * args.tokens_per_text
        reencoded = sum(len(encode(tok, text)) for text in texts)
        parts.append(sampled)
        print(
            f"(a) sampling: {n_texts} texts x {args.tokens_per_text} new tokens = {generated} "
            f"tokens (batch {args.batch_size}, top-k {args.top_k}, seed {args.seed}) in "
            f"{sample_s:.1f} s ({generated / sample_s:.0f} tok/s, model digest included); "
            f"{reencoded} tokens once re-encoded"
        )
        print(f"    first sample: {texts[0][:160]!r}")
    else:
        print("(a) sampling: not needed (WikiBio has the tokens)")

    source = ChainedText(*parts)
    with tempfile.TemporaryDirectory() as tmp:
        stats = KeyStatistics(
            source, root=tmp, progress=args.progress, batch_size=args.stats_batch_size
        )
        t0 = time.perf_counter()
        mom2 = stats.second_moment(model, tok, args.layer, args.tokens)
        stats_s = time.perf_counter() - t0
        if stats.computed != 1 or stats.loaded != 0:
            raise SystemExit(f"expected one computation, got {stats.computed=} {stats.loaded=}")
        files = [f for _, _, fs in os.walk(tmp) for f in fs if f.endswith(".safetensors")]
        finite = bool(torch.isfinite(mom2).all())
    print(
        f"(b) second moment {tuple(mom2.shape)} {mom2.dtype}: {stats.last_tokens} tokens "
        f"(of {args.tokens} asked) in {stats_s:.1f} s ({stats.last_tokens / stats_s:.0f} tok/s); "
        f"finite: {finite}; cache file written: {len(files) == 1}"
    )
    print(f"    source identity: {source.identity}")
    print(f"(a) + (b): {sample_s + stats_s:.1f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load1 = os.getloadavg()[0]
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"peak RSS {rss:.0f} MiB; load average (1 min) {load1:.2f}; {now}")


if __name__ == "__main__":
    main()
