"""memedit: keep a language model's knowledge current without retraining.

Importing this package is cheap and has no side effects; heavy modules (torch, transformers,
faiss) load on first use of the names that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memedit.errors import (
    AlreadyRolledBackError,
    EditNotFoundError,
    EmbedderMismatchError,
    IntegrityError,
    InvalidRequestError,
    MemeditError,
    UnknownArchitectureError,
    UnknownModelError,
)
from memedit.types import Answer, EditRecord, EditRequest, Hit, Probe, ScopeDecision

__version__ = "0.1.0"

_LAZY = {
    "EditableModel": "memedit.editable",
    "load_model": "memedit.models",
    "EditMemory": "memedit.stores.memory",
}

if TYPE_CHECKING:
    from memedit.editable import EditableModel
    from memedit.models import load_model
    from memedit.stores.memory import EditMemory


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'memedit' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AlreadyRolledBackError",
    "Answer",
    "EditMemory",
    "EditNotFoundError",
    "EditRecord",
    "EditRequest",
    "EditableModel",
    "EmbedderMismatchError",
    "Hit",
    "IntegrityError",
    "InvalidRequestError",
    "MemeditError",
    "Probe",
    "ScopeDecision",
    "UnknownArchitectureError",
    "UnknownModelError",
    "load_model",
]
