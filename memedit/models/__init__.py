"""Model catalogue and loading. Importing this package does not import torch or transformers."""

from __future__ import annotations

from memedit.models.catalogue import (
    DEFAULT_MODEL,
    CatalogueEntry,
    WheelPart,
    get_entry,
    list_models,
)
from memedit.models.loading import is_pulled, load_model, model_dir, pull

__all__ = [
    "DEFAULT_MODEL",
    "CatalogueEntry",
    "WheelPart",
    "get_entry",
    "is_pulled",
    "list_models",
    "load_model",
    "model_dir",
    "pull",
]
