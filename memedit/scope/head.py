"""The trained part of the scope classifier: a small MLP over pair features.

Stored as one JSON file (weights as base64 float32 arrays) with the metadata needed to trust
it: the base encoder and its sha256, the feature names, the decision threshold calibrated on
held-out training records, and the sha256 of every training file.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memedit.errors import MemeditError

FORMAT = "memedit-scope-head"
FORMAT_VERSION = 1
WEIGHT_NAMES = ("mean", "std", "w1", "b1", "w2", "b2")


class ScopeHeadError(MemeditError):
    """A scope head file is malformed or was trained on a different base encoder."""


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode_array(name: str, d: object) -> np.ndarray:
    if not isinstance(d, dict) or "shape" not in d or "data" not in d:
        msg = f"weight {name!r} must be an object with 'shape' and 'data'"
        raise ScopeHeadError(msg)
    raw = base64.b64decode(d["data"])
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    shape = tuple(int(s) for s in d["shape"])
    if int(np.prod(shape)) != arr.size:
        msg = f"weight {name!r}: {arr.size} values do not fill shape {shape}"
        raise ScopeHeadError(msg)
    return arr.reshape(shape)


@dataclass
class ScopeHead:
    """Standardise → Linear → ReLU → Linear → sigmoid, in numpy (no torch at inference)."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray  # (in, hidden)
    b1: np.ndarray
    w2: np.ndarray  # (hidden,)
    b2: np.ndarray  # (1,)
    threshold: float = 0.5
    #: Threshold calibrated for question-form edit prompts ("Who is X's father?"), whose
    #: held-out rephrasings score lower than a cloze edit's; None: `threshold` for every edit.
    question_threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_inputs(self) -> int:
        return int(self.w1.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        h = np.maximum(z @ self.w1 + self.b1, 0.0)
        return np.asarray(h @ self.w2 + self.b2[0], dtype=np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1], one per row of `x`."""
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            msg = f"expected features of shape (n, {self.n_inputs}), got {x.shape}"
            raise ScopeHeadError(msg)
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(self.logits(x), -40, 40))))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "threshold": self.threshold,
            "meta": self.meta,
            "weights": {n: _encode_array(getattr(self, n)) for n in WEIGHT_NAMES},
        }
        if self.question_threshold is not None:
            out["question_threshold"] = self.question_threshold
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n", "utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> ScopeHead:
        p = Path(path)
        try:
            data = json.loads(p.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"cannot read scope head {p}: {exc}"
            raise ScopeHeadError(msg) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            msg = f"{p} is not a {FORMAT} file (format={data.get('format')!r:.40})"
            raise ScopeHeadError(msg)
        if data.get("format_version") != FORMAT_VERSION:
            msg = f"{p}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}"
            raise ScopeHeadError(msg)
        weights = data.get("weights", {})
        arrays = {n: _decode_array(n, weights.get(n)) for n in WEIGHT_NAMES}
        threshold = float(data.get("threshold", 0.5))
        if not 0.0 <= threshold <= 1.0:
            msg = f"{p}: threshold {threshold!r} is outside [0, 1]"
            raise ScopeHeadError(msg)
        question = data.get("question_threshold")
        if question is not None and (
            not isinstance(question, (int, float)) or not 0.0 < float(question) < 1.0
        ):
            msg = f"{p}: question_threshold {question!r} is outside (0, 1)"
            raise ScopeHeadError(msg)
        head = cls(
            **arrays,
            threshold=threshold,
            question_threshold=None if question is None else float(question),
            meta=dict(data.get("meta", {})),
        )
        n_in = head.n_inputs
        if head.mean.shape != (n_in,) or head.std.shape != (n_in,) or head.w2.ndim != 1:
            msg = f"{p}: inconsistent weight shapes"
            raise ScopeHeadError(msg)
        return head
