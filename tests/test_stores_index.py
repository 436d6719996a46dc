"""The FAISS edit index: stable ids, flat → IVF past the limit, checksummed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memedit.errors import IndexFileError, InvalidRequestError
from memedit.stores.index import IndexConfig, VectorIndex, read_index_file, write_index_file


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_ids_are_stable_across_removal() -> None:
    idx = VectorIndex(16)
    x = _unit(5, 16)
    idx.add(x, [10, 20, 30, 40, 50])
    assert idx.kind == "flat" and len(idx) == 5
    assert idx.remove([20, 999]) == 1
    scores, ids = idx.search(x[[0, 2, 4]], 1)
    assert ids[:, 0].tolist() == [10, 30, 50]  # no renumbering after a removal
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    got_ids, got_vecs = idx.contents()
    assert sorted(got_ids.tolist()) == [10, 30, 40, 50]
    np.testing.assert_allclose(got_vecs[got_ids.tolist().index(40)], x[3], rtol=1e-6)


def test_search_edge_cases() -> None:
    idx = VectorIndex(8)
    scores, ids = idx.search(_unit(2, 8), 3)
    assert (ids == -1).all() and scores.shape == (2, 3)
    idx.add(_unit(2, 8), [1, 2])
    _, ids = idx.search(_unit(1, 8, seed=1), 10)
    assert sorted(ids[0].tolist()) == [1, 2]  # k is capped at the number stored
    with pytest.raises(InvalidRequestError, match="k"):
        idx.search(_unit(1, 8), 0)
    with pytest.raises(InvalidRequestError, match="shape"):
        idx.add(_unit(1, 9), [3])
    with pytest.raises(InvalidRequestError, match="ids"):
        idx.add(_unit(2, 8), [3])


def test_becomes_ivf_past_the_flat_limit_and_keeps_ids() -> None:
    cfg = IndexConfig(flat_limit=300, nprobe=64, retrain_growth=2.0)
    idx = VectorIndex(32, cfg)
    x = _unit(1000, 32, seed=2)
    ids = np.arange(1000, 2000)
    idx.add(x[:300], ids[:300])
    assert idx.kind == "flat"
    idx.add(x[300:400], ids[300:400])
    assert idx.kind == "ivf" and len(idx) == 400 and idx.nlist >= 16
    trained = idx.nlist
    idx.add(x[400:], ids[400:])  # grew 2.5x past its training size: retrained, more lists
    assert idx.kind == "ivf" and len(idx) == 1000 and idx.nlist > trained
    _, got = idx.search(x[::50], 1)
    assert got[:, 0].tolist() == ids[::50].tolist()  # nprobe = all lists: exact
    idx.remove(ids[:500])
    assert len(idx) == 500
    _, got = idx.search(x[:500:50], 5)
    assert not set(got.ravel().tolist()) & set(ids[:500].tolist())
    all_ids, vecs = idx.contents()
    order = np.argsort(all_ids)
    np.testing.assert_array_equal(all_ids[order], ids[500:])
    np.testing.assert_allclose(vecs[order], x[500:], rtol=1e-6)
    idx.reset(x[:10], ids[:10])
    assert idx.kind == "flat" and len(idx) == 10


def test_ivf_recall_on_clustered_vectors() -> None:
    rng = np.random.default_rng(3)
    centres = _unit(40, 48, seed=4)
    x = centres[rng.integers(0, 40, 4000)] + 0.15 * rng.standard_normal((4000, 48))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    flat, ivf = VectorIndex(48), VectorIndex(48, IndexConfig(flat_limit=1000, nprobe=8))
    flat.reset(x, np.arange(4000))
    ivf.reset(x, np.arange(4000))
    assert ivf.kind == "ivf"
    q = x[:200] + 0.05 * rng.standard_normal((200, 48)).astype(np.float32)
    _, exact = flat.search(q, 10)
    _, approx = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.8, recall


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_file_round_trip(tmp_path: Path, kind: str) -> None:
    cfg = IndexConfig(flat_limit=100 if kind == "ivf" else 10_000)
    idx = VectorIndex(16, cfg)
    x = _unit(500, 16, seed=5)
    idx.add(x, np.arange(500) * 3)
    assert idx.kind == kind
    path = tmp_path / "index.faiss"
    write_index_file(path, idx, {"generation": 7, "log_id": "abc"})
    assert not list(tmp_path.glob("*.tmp-*"))
    back, header = read_index_file(path, 16, cfg)
    assert header["generation"] == 7 and header["count"] == 500 and header["kind"] == kind
    assert back.kind == kind and len(back) == 500
    np.testing.assert_array_equal(back.search(x[:20], 3)[1], idx.search(x[:20], 3)[1])
    back.add(_unit(1, 16, seed=6), [100_000])  # still usable after loading
    assert len(back) == 501


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    idx = VectorIndex(8)
    idx.add(_unit(50, 8), np.arange(50))
    path = tmp_path / "index.faiss"
    write_index_file(path, idx, {"generation": 1})
    data = bytearray(path.read_bytes())
    cases = {
        "flipped": bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]),
        "truncated": bytes(data[: len(data) // 2]),
        "magic": b"XXXX" + bytes(data[4:]),
        "empty": b"",
    }
    for name, blob in cases.items():
        path.write_bytes(blob)
        with pytest.raises(IndexFileError):
            read_index_file(path, 8)
        assert name
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="dimension"):
        read_index_file(path, 9)
    with pytest.raises(IndexFileError):
        read_index_file(tmp_path / "missing.faiss", 8)


def test_config_is_validated() -> None:
    with pytest.raises(InvalidRequestError, match="flat_limit"):
        IndexConfig(flat_limit=0)
    with pytest.raises(InvalidRequestError):
        IndexConfig(retrain_growth=1.0)
    assert IndexConfig().nlist(10**6) == 1000
    assert IndexConfig().nlist(100) == 16
