"""Helpers shared by the adapter unit tests: logits of one text, the number of hooks left on a
model, and a wrapper over a tiny model with an offline embedder, scope and counterfactual."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memedit.editable import EditableModel, RouterConfig
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath, OverlapScope


def logits(model: Any, tok: Any, text: str) -> torch.Tensor:
    """The model's logits over ``text`` (no gradient)."""
    with torch.no_grad():
        out: torch.Tensor = model(**tok(text, return_tensors="pt")).logits
    return out


def hook_count(model: Any) -> int:
    """Forward and forward-pre hooks registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def wrap_tiny(model: Any, tok: Any, path: Path) -> EditableModel:
    """An `EditableModel` over a tiny model with its edit memory at ``path``."""
    return EditableModel(
        model,
        tok,
        memory=EditMemory.open(path, embedder=HashingEmbedder()),
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=4),
        model_name="tiny",
    )
