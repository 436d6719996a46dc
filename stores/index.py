"""The FAISS edit index: normalised vectors, inner product, stable int64 ids (the log's edit ids).

Small stores use an exact flat index (``IndexIDMap2`` over ``IndexFlatIP``). Past
`IndexConfig.flat_limit` vectors it becomes an inverted-file index (``IndexIVFFlat``, inner
product, ``nlist`` ≈ `IndexConfig.lists_per_sqrt` · √n), retrained when it has grown
`IndexConfig.retrain_growth` times past the size it was trained on. Both keep the caller's ids,
so removing an edit never renumbers another (IVF rather than HNSW because HNSW cannot remove).
Where faiss-gpu is installed and a GPU is visible, searches run on a GPU copy of the index,
refreshed after each change; the CPU index stays the one that is changed and saved.

On disk an index is one file: a magic string, a JSON header (the log it belongs to, the log
generation it reflects, the embedder, the vector count, a SHA-256 of the payload) and the
FAISS-serialised payload. `read_index_file` refuses a file whose checksum does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from memedit.errors import IndexFileError, InvalidRequestError

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

MAGIC = b"MEMEDIT-FAISS\x00"
FILE_FORMAT = 1
_HEAD = struct.Struct("<II")  # format, header length


@dataclass(frozen=True)
class IndexConfig:
    """When the index switches from exact to approximate search, and how approximate.

    The defaults come from ``benchmarks/memory_ops.py`` on a 2-core CPU (BENCHMARKS.md):
    an exact search over 384-d vectors costs ~1.3 ms per query at 10^4 and grows linearly past
    the 2 ms budget beyond ~2·10^4, while IVF with ``nlist`` = √n and ``nprobe`` 16 keeps the
    median at ~1.4 ms at 10^6 with recall@10 ≈ 0.97 (nprobe 24: 0.985 at ~2.2 ms).
    """

    flat_limit: int = 20_000
    lists_per_sqrt: float = 1.0
    nprobe: int = 16
    train_points_per_list: int = 64
    retrain_growth: float = 4.0
    use_gpu: bool | None = None  # None: where faiss-gpu and a GPU are present

    def __post_init__(self) -> None:
        for name in ("flat_limit", "nprobe", "train_points_per_list"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                msg = f"IndexConfig.{name} must be a positive integer, got {value!r}"
                raise InvalidRequestError(msg, field=name, value=value)
        if self.lists_per_sqrt <= 0 or self.retrain_growth <= 1:
            msg = "IndexConfig.lists_per_sqrt must be > 0 and retrain_growth > 1"
            raise InvalidRequestError(msg, field="lists_per_sqrt", value=self.lists_per_sqrt)

    def nlist(self, n: int) -> int:
        """Number of inverted lists for `n` vectors (at least 16, at most n // 39)."""
        want = round(self.lists_per_sqrt * math.sqrt(max(n, 1)))
        return max(16, min(want, max(16, n // 39)))


def gpu_available() -> bool:
    """True where this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_matrix(vectors: NDArray[Any], dim: int) -> NDArray[np.float32]:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        msg = f"vectors must have shape (n, {dim}), got {x.shape}"
        raise InvalidRequestError(msg, field="vectors", value=x.shape)
    return x


def _as_ids(ids: Any) -> NDArray[np.int64]:
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


class VectorIndex:
    """A FAISS index over unit vectors keyed by int64 ids (see the module docstring)."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        self.dim = dim
        self.config = config or IndexConfig()
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._trained_on = 0
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._use_gpu = gpu_available() if self.config.use_gpu is None else self.config.use_gpu

    # ------------------------------------------------------------------ facts
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def nlist(self) -> int:
        return int(self._index.nlist) if self.kind == "ivf" else 0

    # ------------------------------------------------------------------ changes
    def add(self, vectors: NDArray[Any], ids: Any) -> None:
        x = _as_matrix(vectors, self.dim)
        i = _as_ids(ids)
        if len(i) != len(x):
            msg = f"{len(x)} vectors but {len(i)} ids"
            raise InvalidRequestError(msg, field="ids", value=len(i))
        if not len(i):
            return
        self._index.add_with_ids(x, i)
        self._gpu = None
        n = self.ntotal
        limit = self.config.flat_limit
        if self.kind == "ivf":
            limit = max(limit, int(self.config.retrain_growth * self._trained_on))
        if n > limit:
            self._retrain()

    def remove(self, ids: Any) -> int:
        """Remove `ids` (missing ones are ignored); returns how many were removed."""
        i = _as_ids(ids)
        if not len(i):
            return 0
        removed = int(self._index.remove_ids(i))
        self._gpu = None
        return removed

    def reset(self, vectors: NDArray[Any], ids: Any) -> None:
        """Replace the whole content, choosing flat or IVF for the new size."""
        x = _as_matrix(vectors, self.dim)
        i = _as_ids(ids)
        self._gpu = None
        if len(i) > self.config.flat_limit:
            self._index = self._train_ivf(x, i)
        else:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self._trained_on = 0
            if len(i):
                self._index.add_with_ids(x, i)

    def _retrain(self) -> None:
        ids, vectors = self.contents()
        log.info("retraining the edit index on %d vectors", len(ids))
        self._index = self._train_ivf(vectors, ids)
        self._gpu = None

    def _train_ivf(self, x: NDArray[np.float32], ids: NDArray[np.int64]) -> Any:
        n = len(ids)
        nlist = self.config.nlist(n)
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.max_points_per_centroid = self.config.train_points_per_list
        ivf.cp.seed = 1234
        sample = x
        cap = nlist * self.config.train_points_per_list
        if n > cap:
            rng = np.random.default_rng(1234)
            sample = x[np.sort(rng.choice(n, size=cap, replace=False))]
        ivf.train(sample)
        ivf.add_with_ids(x, ids)
        ivf.nprobe = min(self.config.nprobe, nlist)
        self._trained_on = n
        return ivf

    # ------------------------------------------------------------------ reading
    def contents(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """All (ids, vectors) held, in storage order."""
        if self.kind == "flat":
            n = self.ntotal
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vecs = (
                self._index.index.reconstruct_n(0, n)
                if n
                else np.empty((0, self.dim), dtype=np.float32)
            )
            return ids, np.ascontiguousarray(vecs, dtype=np.float32)
        inv = self._index.invlists
        id_parts: list[NDArray[np.int64]] = []
        vec_parts: list[NDArray[np.float32]] = []
        for lst in range(self._index.nlist):
            size = inv.list_size(lst)
            if not size:
                continue
            id_parts.append(faiss.rev_swig_ptr(inv.get_ids(lst), size).astype(np.int64))
            codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size).copy()
            vec_parts.append(codes.view(np.float32).reshape(size, self.dim))
        if not id_parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate(id_parts), np.concatenate(vec_parts)

    def ids(self) -> NDArray[np.int64]:
        return self.contents()[0]

    def search(
        self, queries: NDArray[Any], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Top-`k` by inner product for each query row: (scores, ids), -1 ids where fewer."""
        q = _as_matrix(queries, self.dim)
        if not isinstance(k, int) or k < 1:
            msg = f"k must be a positive integer, got {k!r}"
            raise InvalidRequestError(msg, field="k", value=k)
        if self.ntotal == 0:
            return (np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64))
        k = min(k, self.ntotal)
        scores, ids = self._searcher().search(q, k)
        return scores, ids.astype(np.int64, copy=False)

    def _searcher(self) -> Any:
        if not self._use_gpu:
            return self._index
        if self._gpu is None:
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
                if self.kind == "ivf":
                    faiss.GpuParameterSpace().set_index_parameter(
                        self._gpu, "nprobe", int(self._index.nprobe)
                    )
            except Exception as exc:  # e.g. an index type the GPU cloner does not support
                log.warning("searching on the CPU: the index could not move to the GPU (%s)", exc)
                self._use_gpu = False
                return self._index
        return self._gpu

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        return bytes(faiss.serialize_index(self._index))

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, config: IndexConfig | None = None) -> VectorIndex:
        index: Any = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if int(index.d) != dim:
            msg = f"the saved index has dimension {index.d}, the embedder {dim}"
            raise IndexFileError(msg)
        out = cls(dim, config)
        if isinstance(index, faiss.IndexIVF):  # deserialize_index returns the concrete class
            index.nprobe = min(out.config.nprobe, int(index.nlist))
            out._trained_on = int(index.ntotal)
        elif not isinstance(index, faiss.IndexIDMap2):
            msg = f"the saved index is a {type(index).__name__}, not an id-mapped flat or IVF index"
            raise IndexFileError(msg)
        out._index = index
        return out


# ---------------------------------------------------------------------------------- files
def write_index_file(path: Path, index: VectorIndex, header: dict[str, Any]) -> None:
    """Write `index` with `header` atomically: temporary file, fsync, rename, fsync the folder."""
    payload = index.to_bytes()
    head = dict(header)
    head.update(
        count=index.ntotal,
        kind=index.kind,
        dim=index.dim,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    head_bytes = json.dumps(head, sort_keys=True).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(_HEAD.pack(FILE_FORMAT, len(head_bytes)))
            f.write(head_bytes)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_index_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of an index file and the byte offset of its payload."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(MAGIC) + _HEAD.size)
            if len(start) < len(MAGIC) + _HEAD.size or not start.startswith(MAGIC):
                msg = f"{path} is not a memedit index file (bad magic)"
                raise IndexFileError(msg)
            fmt, head_len = _HEAD.unpack(start[len(MAGIC) :])
            if fmt != FILE_FORMAT:
                msg = f"{path} has index file format {fmt}; this memedit reads {FILE_FORMAT}"
                raise IndexFileError(msg)
            raw = f.read(head_len)
    except OSError as exc:
        msg = f"cannot read index file {path}: {exc}"
        raise IndexFileError(msg) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} has a corrupt header: {exc}"
        raise IndexFileError(msg) from exc
    if not isinstance(header, dict):
        msg = f"{path} has a corrupt header (not a JSON object)"
        raise IndexFileError(msg)
    return header, len(MAGIC) + _HEAD.size + head_len


def read_index_file(
    path: Path, dim: int, config: IndexConfig | None = None
) -> tuple[VectorIndex, dict[str, Any]]:
    """Load an index file written by `write_index_file`, verifying its checksum and count."""
    header, offset = read_index_header(path)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            payload = f.read()
    except OSError as exc:
        msg = f"cannot read index file {path}: {exc}"
        raise IndexFileError(msg) from exc
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        msg = f"{path} fails its checksum (truncated or corrupt)"
        raise IndexFileError(msg)
    try:
        index = VectorIndex.from_bytes(payload, dim, config)
    except RuntimeError as exc:  # faiss reports a malformed payload as RuntimeError
        msg = f"{path} holds an unreadable FAISS index: {exc}"
        raise IndexFileError(msg) from exc
    if index.ntotal != header.get("count"):
        msg = f"{path} holds {index.ntotal} vectors but its header says {header.get('count')}"
        raise IndexFileError(msg)
    return index, header
