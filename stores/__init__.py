"""Edit memory: embedders, the FAISS edit index and the SQL edit log (`memedit.stores`).

Submodules are imported on first use (faiss, SQLAlchemy and the embedding backends are not
loaded by ``import memedit.stores``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedders import Embedder, HashingEmbedder, MiniLMEmbedder
    from .index import IndexConfig, VectorIndex
    from .log import EditLog
    from .memory import INDEX_FILE, LOG_FILE, EditMemory

__all__ = [
    "INDEX_FILE",
    "LOG_FILE",
    "EditLog",
    "EditMemory",
    "Embedder",
    "HashingEmbedder",
    "IndexConfig",
    "MiniLMEmbedder",
    "VectorIndex",
]

_WHERE = {
    "Embedder": "embedders",
    "HashingEmbedder": "embedders",
    "MiniLMEmbedder": "embedders",
    "IndexConfig": "index",
    "VectorIndex": "index",
    "EditLog": "log",
    "EditMemory": "memory",
    "INDEX_FILE": "memory",
    "LOG_FILE": "memory",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
