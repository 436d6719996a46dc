"""Embedders: the model-free hashing embedder (unit) and MiniLM on both backends (integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memedit.errors import EmbedderMismatchError, InvalidRequestError
from memedit.stores.embedders import Embedder, HashingEmbedder, MiniLMEmbedder


def test_hashing_embedder_shape_norm_and_determinism() -> None:
    emb = HashingEmbedder()
    assert isinstance(emb, Embedder)
    assert emb.dim == 256 and "256" in emb.name
    texts = ["The place of death of Leo Arons is", "", "Ünïcode tèxt ✓"]
    x = emb.encode(texts)
    assert x.shape == (3, 256) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[[0, 2]], axis=1), 1.0, rtol=1e-6)
    assert not x[1].any()  # no features: the zero vector, not NaN
    np.testing.assert_array_equal(x, HashingEmbedder().encode(texts))
    # stable across processes and platforms (BLAKE2b, not the salted built-in hash)
    y = emb.encode(["Leo Arons"])[0]
    nz = np.flatnonzero(y)
    assert nz.tolist() == [11, 59, 71, 99, 104, 158, 182, 223, 237]
    assert np.sign(y[nz]).astype(int).tolist() == [-1, 1, 1, 1, -1, -1, -1, 1, 1]


def test_hashing_embedder_similarity_follows_shared_words() -> None:
    emb = HashingEmbedder(dim=512)
    a, b, c = emb.encode(
        ["Where did Leo Arons die?", "The place of death of Leo Arons is", "The sky is blue"]
    )
    assert float(a @ b) > float(a @ c) + 0.2
    assert emb.encode([]).shape == (0, 512)


def test_hashing_embedder_rejects_bad_input() -> None:
    emb = HashingEmbedder()
    with pytest.raises(InvalidRequestError) as info:
        emb.encode("not a list")  # type: ignore[arg-type]
    assert info.value.field == "texts"
    with pytest.raises(InvalidRequestError) as info:
        emb.encode(["ok", 3])  # type: ignore[list-item]
    assert info.value.field == "texts[1]"
    with pytest.raises(InvalidRequestError, match="dim"):
        HashingEmbedder(dim=2)


def test_minilm_rejects_bad_options() -> None:
    with pytest.raises(InvalidRequestError, match="backend"):
        MiniLMEmbedder(backend="tensorflow")
    with pytest.raises(InvalidRequestError, match="batch_size"):
        MiniLMEmbedder(batch_size=0)


@pytest.mark.integration
def test_minilm_backends_agree_and_share_one_identity() -> None:
    pytest.importorskip("onnxruntime")
    texts = [
        "The place of death of Leo Arons is",
        "Where did Leo Arons die?",
        "What is the capital of France? " * 20,
        "x",
    ]
    onnx = MiniLMEmbedder(backend="onnx")
    torch_ = MiniLMEmbedder(backend="torch", device="cpu")
    a, b = onnx.encode(texts), torch_.encode(texts)
    assert a.shape == b.shape == (4, 384)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.9999, cos
    assert onnx.name == torch_.name  # the backend is not part of the identity (see module doc)
    # paraphrase close, unrelated far
    assert float(a[0] @ a[1]) > 0.6 > float(a[0] @ a[2])
    # a batch gives what one-at-a-time gives (padding and length-sorting do not leak)
    single = np.concatenate([onnx.encode([t]) for t in texts])
    np.testing.assert_allclose(single, a, atol=2e-5)


def test_minilm_rejects_a_bad_bf16_min_batch() -> None:
    with pytest.raises(InvalidRequestError, match="bf16_min_batch"):
        MiniLMEmbedder(bf16_min_batch=0)


@pytest.mark.integration
def test_large_batches_use_bf16_where_native_and_agree_with_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memedit.datasets import load_requests
    from memedit.stores import embedders

    if not embedders.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16 matrix units (AMX / AVX512-BF16)")
    texts = [r.prompt for r in load_requests("CounterFact", limit=40)]
    fp32 = MiniLMEmbedder(bf16_min_batch=None).encode(texts)
    mixed = MiniLMEmbedder(bf16_min_batch=16)
    np.testing.assert_allclose(mixed.encode(texts[:15]), fp32[:15], atol=2e-5)  # fp32 path
    bf16 = mixed.encode(texts)
    assert mixed._bf16 is not False and mixed._bf16 is not None  # the bf16 copy was used
    assert not np.array_equal(bf16, fp32)  # it really is another computation ...
    cos = (bf16 * fp32).sum(axis=1)
    assert cos.min() >= embedders.BF16_MIN_COSINE, cos.min()  # ... of the same function
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    # a copy that fails its agreement check is refused, and large batches stay in fp32
    monkeypatch.setattr(embedders, "BF16_MIN_COSINE", 1.5)
    strict = MiniLMEmbedder(bf16_min_batch=16)
    assert strict.encode(texts).tobytes() == fp32.tobytes()
    assert strict._bf16 is False


@pytest.mark.integration
def test_default_memory_retrieves_real_rephrasings(tmp_path: Path) -> None:
    from memedit.datasets import load_requests
    from memedit.stores.memory import EditMemory

    reqs = load_requests("ZsRE", limit=200)
    with EditMemory.open(tmp_path / "mem") as mem:  # the default embedder: MiniLM
        assert mem.embedder.name.startswith("sentence-transformers/all-MiniLM-L6-v2")
        recs = mem.add(reqs)
        hits = mem.search_batch([r.rephrase[0] for r in reqs], k=5)
        top1 = np.mean([h[0].record.id == r.id for h, r in zip(hits, recs, strict=True)])
        assert top1 > 0.8, top1
    with pytest.raises(EmbedderMismatchError, match="MiniLM"):
        EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())


@pytest.mark.integration
def test_auto_backend_falls_back_to_torch_when_the_export_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memedit.stores import embedders

    def broken(model_path: Path) -> Path:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(embedders, "ensure_onnx_export", broken)
    monkeypatch.setattr(embedders, "_torch_device", lambda: "cpu")
    emb = MiniLMEmbedder()
    assert emb.backend == "torch"
    assert emb.encode(["hello"]).shape == (1, 384)
    with pytest.raises(RuntimeError, match="exporter unavailable"):
        MiniLMEmbedder(backend="onnx")  # asked for explicitly: no silent fallback
