"""Merged adapters: the ``adapter`` strategy (issue 5): GRACE, LoRA and AdaLoRA (through peft),
T-Patcher and WISE.

    from memedit.adapters import get_adapter
    adapter = get_adapter("grace")(model)
    adapter.commit(ids, adapter.prepare(tokenizer, requests))
    with adapter.active():
        model(...)

Importing this package does not import torch. Methods register themselves on import
(``register_adapter`` in their module); :func:`adapter_names` lists them.
"""

from __future__ import annotations

from . import adalora as _adalora  # noqa: F401  (registers adalora; needs peft only when used)
from . import grace as _grace  # noqa: F401  (registers grace)
from . import lora as _lora  # noqa: F401  (registers lora; needs peft only when used)
from . import tpatcher as _tpatcher  # noqa: F401  (registers tpatcher)
from . import wise as _wise  # noqa: F401  (registers wise)
from .adalora import AdaLoraAdapter, AdaLoraHparams
from .api import (
    Adapter,
    AdapterError,
    NonFiniteAdapterError,
    adapter_names,
    adapter_settings,
    get_adapter,
    register_adapter,
)
from .codebook import Codebook, Item
from .grace import GraceAdapter, GraceHparams
from .lora import LoraAdapter, LoraHparams
from .side_memory import SideMemory, WiseItem
from .tpatcher import Patch, TPatcherAdapter, TPatcherHparams
from .wise import WiseAdapter, WiseHparams

__all__ = [
    "AdaLoraAdapter",
    "AdaLoraHparams",
    "Adapter",
    "AdapterError",
    "Codebook",
    "GraceAdapter",
    "GraceHparams",
    "Item",
    "LoraAdapter",
    "LoraHparams",
    "NonFiniteAdapterError",
    "Patch",
    "SideMemory",
    "TPatcherAdapter",
    "TPatcherHparams",
    "WiseAdapter",
    "WiseHparams",
    "WiseItem",
    "adapter_names",
    "adapter_settings",
    "get_adapter",
    "register_adapter",
]
