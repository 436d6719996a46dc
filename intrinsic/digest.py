"""Digests of model weights: what a saved delta and a cached covariance are keyed by.

:func:`tensors_digest` hashes named tensors exactly as the evaluator's
``memedit.evaluation.weights_digest`` does (sha256 over ``name|dtype|shape`` and the raw
bytes, parameters then buffers), so :func:`model_digest` of a whole model equals that digest.
Hashing a model is not free (about a second per 500 MB), so digests are memoised on a
*fingerprint* of the tensors involved (identity, storage pointer and in-place version
counter of each): an unchanged model is hashed once per process.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["fingerprint", "model_digest", "named_tensors", "tensors_digest"]

Fingerprint = tuple[tuple[str, int, int, int], ...]

# model -> {selection label: (fingerprint, digest)}
_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[Fingerprint, str]]] = (
    weakref.WeakKeyDictionary()
)


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer, by name (tied weights once), as the digest sees them."""
    return list(model.named_parameters()) + list(model.named_buffers())


def tensors_digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's ``name|dtype|shape`` and its bytes, in the order given."""
    import torch

    h = hashlib.sha256()
    for name, t in items:
        data = t.detach()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        raw = data.contiguous().reshape(-1).view(torch.uint8).cpu()
        h.update(raw.numpy().data)
    return h.hexdigest()


def fingerprint(items: Iterable[tuple[str, torch.Tensor]]) -> Fingerprint | None:
    """Identity of the tensors' current contents without reading them: ``None`` when it cannot
    be known (inference-mode tensors have no version counter)."""
    try:
        return tuple((n, id(t), t.data_ptr(), t._version) for n, t in items)
    except RuntimeError:
        return None


def model_digest(
    model: nn.Module,
    select: Callable[[str], bool] | None = None,
    *,
    label: str = "all",
) -> str:
    """Digest of the model's tensors whose names pass ``select`` (all by default).

    ``label`` names the selection for the memo; two different selections on the same model
    must use different labels.
    """
    items = [(n, t) for n, t in named_tensors(model) if select is None or select(n)]
    fp = fingerprint(items)
    per_model = _MEMO.setdefault(model, {})
    hit = per_model.get(label)
    if fp is not None and hit is not None and hit[0] == fp:
        return hit[1]
    digest = tensors_digest(items)
    if fp is not None:
        per_model[label] = (fp, digest)
    return digest
