"""Edit-memory operations: embedding, adding and retrieving edits (BENCHMARKS.md).

    python benchmarks/memory_ops.py                  # every section, each in a fresh process
    python benchmarks/memory_ops.py --section ivf    # one section: embed add flat ivf real

Sections:
  embed  MiniLM throughput, onnx vs torch backend, and their agreement (cosine)
  add    adding one edit (p50, incl. embedding and the SQLite commit) and batched edits/s,
         on real KnowEdit CounterFact prompts, default (onnx) and torch backends
  flat   exact-search latency vs store size (synthetic 384-d): where IVF must take over
  ivf    10^6 synthetic 384-d unit vectors (faiss.contrib SyntheticDataset): build time,
         single-query latency and recall@10 vs exact search, per nprobe
  real   ~10^4 real edits (KnowEdit fact datasets, dev + CounterFact train) with MiniLM:
         add throughput, rephrase top-1/top-5 retrieval, end-to-end search() latency

Every section prints its process's peak RSS. Latencies are medians over single queries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SECTIONS = ("embed", "add", "flat", "ivf", "real")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def counterfact_prompts(n: int) -> list[str]:
    from memedit.datasets import load_requests

    return [r.prompt for r in load_requests("CounterFact", limit=n)]


# ---------------------------------------------------------------------------------- embed
def section_embed() -> None:
    from memedit.stores.embedders import MiniLMEmbedder

    texts = counterfact_prompts(2000)
    onnx = MiniLMEmbedder(backend="onnx")
    torch_ = MiniLMEmbedder(backend="torch", device="cpu")
    a, b = onnx.encode(texts), torch_.encode(texts)
    cos = (a * b).sum(axis=1)
    print(
        f"onnx vs torch cosine on {len(texts)} prompts: min {cos.min():.7f} mean {cos.mean():.7f}"
    )
    for emb in (onnx, torch_):
        for bs in (32, 64, 128):
            emb.batch_size = bs
            emb.encode(texts[:200])
            t, c = time.perf_counter(), time.process_time()
            emb.encode(texts)
            rate = len(texts) / (time.perf_counter() - t)
            cpu = len(texts) / (time.process_time() - c)
            print(f"  {emb.backend:5s} batch {bs:3d}: {rate:7.0f} texts/s ({cpu:.0f} per CPU-s)")
        emb.batch_size = 64
        lat = timed(lambda e=emb: e.encode([texts[7]]), 100)
        print(f"  {emb.backend:5s} one text: p50 {pct(lat, 50):.2f} ms")


# ---------------------------------------------------------------------------------- add
def section_add(backends: list[str], threads: int | None) -> None:
    from memedit.datasets import load_requests
    from memedit.stores.embedders import MiniLMEmbedder
    from memedit.stores.memory import EditMemory

    reqs = load_requests("CounterFact", limit=4300)
    for backend in backends:
        emb = MiniLMEmbedder(backend=backend, device="cpu", threads=threads)
        with tempfile.TemporaryDirectory() as tmp, EditMemory.open(tmp, embedder=emb) as mem:
            mem.add(reqs[:20])  # warm-up
            lat = []
            for r in reqs[20:220]:
                t = time.perf_counter()
                mem.add([r])
                lat.append((time.perf_counter() - t) * 1e3)
            print(
                f"[{backend}] add one edit (embed + SQLite commit + index), n={len(lat)}: "
                f"p50 {pct(lat, 50):.2f} ms, p90 {pct(lat, 90):.2f} ms"
            )
            for size in (100, 1000, 4000):
                batch = reqs[300 : 300 + size]
                t, c = time.perf_counter(), time.process_time()
                mem.add(batch)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                print(
                    f"[{backend}] add a batch of {size}: {size / dt:7.0f} edits/s ({dt:.2f} s wall,"
                    f" {dc:.2f} s CPU = {size / dc:.0f} edits per CPU-second)"
                )
            t = time.perf_counter()
            mem.save()
            dt = time.perf_counter() - t
            print(f"[{backend}] memory holds {len(mem)} edits; save() {dt * 1e3:.0f} ms")


# ---------------------------------------------------------------------------------- flat
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _synthetic(nb: int, nq: int) -> tuple[np.ndarray, np.ndarray]:
    from faiss.contrib.datasets import SyntheticDataset

    ds = SyntheticDataset(384, 0, nb, nq, metric="IP", seed=1338)
    return _unit(ds.get_database()), _unit(ds.get_queries())


def section_flat() -> None:
    from memedit.stores.index import IndexConfig, VectorIndex

    for nb in (10_000, 50_000, 100_000, 200_000):
        xb, xq = _synthetic(nb, 300)
        idx = VectorIndex(384, IndexConfig(flat_limit=10**9))
        idx.reset(xb, np.arange(nb))
        idx.search(xq[:10], 10)
        lat = [timed(lambda q=q, i=idx: i.search(q[None], 10), 1)[0] for q in xq]
        print(f"flat n={nb:>7d}: one query p50 {pct(lat, 50):.2f} ms, p90 {pct(lat, 90):.2f} ms")


# ---------------------------------------------------------------------------------- ivf
def section_ivf(n: int) -> None:
    import faiss

    from memedit.stores.index import IndexConfig, VectorIndex

    t = time.perf_counter()
    xb, xq = _synthetic(n, 1000)
    print(f"generated {n} + {len(xq)} synthetic vectors in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    _, exact = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"exact top-10 for {len(xq)} queries (brute force): {time.perf_counter() - t:.1f} s")
    cfg = IndexConfig()
    idx = VectorIndex(384, cfg)
    t = time.perf_counter()
    idx.reset(xb, np.arange(n))
    print(
        f"IVF build ({idx.kind}, nlist {idx.nlist}, trained on "
        f"{min(n, idx.nlist * cfg.train_points_per_list)} points): {time.perf_counter() - t:.1f} s"
    )
    del xb
    inner = idx._index  # the benchmark sweeps nprobe
    for nprobe in (8, 16, 24, 32, 48):
        inner.nprobe = nprobe
        idx.search(xq[:20], 10)
        lat, got = [], []
        for q in xq:
            t = time.perf_counter()
            _, ids = idx.search(q[None], 10)
            lat.append((time.perf_counter() - t) * 1e3)
            got.append(ids[0])
        recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)])
        t = time.perf_counter()
        idx.search(xq, 10)
        batch_ms = (time.perf_counter() - t) * 1e3 / len(xq)
        mark = "  <- default" if nprobe == cfg.nprobe else ""
        print(
            f"  nprobe {nprobe:2d}: one query p50 {pct(lat, 50):.2f} ms p90 {pct(lat, 90):.2f} ms"
            f" | batched {batch_ms:.3f} ms/query | recall@10 {recall:.3f}{mark}"
        )


# ---------------------------------------------------------------------------------- real
def _real_requests(n: int) -> list:
    from memedit.datasets import FACT_DATASETS, load_requests, record_to_request
    from memedit.paths import knowedit_dir

    reqs = [r for d in FACT_DATASETS for r in load_requests(d)]
    if len(reqs) < n:
        path = knowedit_dir() / "train" / "CounterFact" / "counterfact-train.json"
        extra = json.loads(path.read_text(encoding="utf-8"))
        for rec in extra[: n - len(reqs)]:
            reqs.append(record_to_request("CounterFact", rec))
    return reqs[:n]


def section_real(n: int, threads: int | None) -> None:
    from memedit.stores.embedders import MiniLMEmbedder
    from memedit.stores.memory import EditMemory

    reqs = _real_requests(n)
    print(f"{len(reqs)} real edits (KnowEdit fact datasets, dev + CounterFact train)")
    emb = MiniLMEmbedder(threads=threads)
    with tempfile.TemporaryDirectory() as tmp, EditMemory.open(tmp, embedder=emb) as mem:
        print(f"embedder: {mem.embedder!r}")
        t = time.perf_counter()
        records = []
        for i in range(0, len(reqs), 2000):
            records += mem.add(reqs[i : i + 2000])
        dt = time.perf_counter() - t
        print(
            f"added {len(records)} edits in {dt:.1f} s: {len(records) / dt:.0f} edits/s "
            f"(index {mem.index.kind})"
        )
        queries = [(r.request.rephrase[0], r) for r in records if r.request.rephrase]
        t = time.perf_counter()
        hits = mem.search_batch([q for q, _ in queries], k=5)
        dt = time.perf_counter() - t
        top1 = np.mean([h[0].record.id == r.id for h, (_, r) in zip(hits, queries, strict=True)])
        top1_prompt = np.mean(
            [
                h[0].record.request.prompt == r.request.prompt
                for h, (_, r) in zip(hits, queries, strict=True)
            ]
        )
        top5 = np.mean(
            [r.id in {x.record.id for x in h} for h, (_, r) in zip(hits, queries, strict=True)]
        )
        print(
            f"rephrase retrieval over {len(queries)} queries: top-1 {top1:.3f} "
            f"(same prompt {top1_prompt:.3f}), top-5 {top5:.3f}; "
            f"search_batch {dt * 1e3 / len(queries):.2f} ms/query"
        )
        sample = [q for q, _ in queries[:300]]
        lat = [timed(lambda q=q: mem.search(q, k=5), 1)[0] for q in sample]
        print(
            f"search() one query end to end (embed + index + log): p50 {pct(lat, 50):.2f} ms, "
            f"p90 {pct(lat, 90):.2f} ms"
        )
        vec = mem.embedder.encode(sample)
        lat = [timed(lambda v=v: mem.search_vectors(v[None], 5), 1)[0] for v in vec]
        print(f"search_vectors() (index + log fetch, no embedding): p50 {pct(lat, 50):.2f} ms")
        t = time.perf_counter()
        mem.rebuild()
        print(f"rebuild from the log (stored embeddings): {time.perf_counter() - t:.2f} s")


# ---------------------------------------------------------------------------------- main
def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def run_section(name: str, args: argparse.Namespace) -> None:
    t = time.perf_counter()
    if args.threads is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch_threads(args.threads)
        print(f"[{name}] faiss, onnxruntime and torch limited to {args.threads} thread(s)")
    if name == "embed":
        section_embed()
    elif name == "add":
        section_add(args.backends.split(","), args.threads)
    elif name == "flat":
        section_flat()
    elif name == "ivf":
        section_ivf(args.ivf_n)
    elif name == "real":
        section_real(args.real_n, args.threads)
    load = os.getloadavg()[0]
    print(
        f"[{name}] wall {time.perf_counter() - t:.1f} s, peak RSS {peak_rss_mb():.0f} MB, "
        f"1-min load average at the end {load:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--section", choices=SECTIONS)
    ap.add_argument("--ivf-n", type=int, default=1_000_000)
    ap.add_argument("--real-n", type=int, default=10_000)
    ap.add_argument("--backends", default="onnx,torch", help="embedder backends for 'add'")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for faiss/onnxruntime/torch (default: their own; 1 helps on a busy CPU)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.section:
        run_section(args.section, args)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for name in SECTIONS:
        print(f"=== {name}", flush=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--section",
            name,
            "--ivf-n",
            str(args.ivf_n),
            "--real-n",
            str(args.real_n),
        ]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
