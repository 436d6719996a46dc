"""In-weight edits (FT-L/FT-M, ROME, MEMIT, AlphaEdit): the `weights` strategy.

    from memedit.intrinsic import apply_edit
    delta = apply_edit("rome", model, tokenizer, [request])   # a WeightDelta
    delta.save("edit-1/"); delta.revert()
    WeightDelta.load("edit-1/").apply_to(fresh_model)          # the same edited weights

Importing this package does not import torch. Methods register themselves on import
(``register_method`` in their module); :func:`method_names` lists them.
"""

from __future__ import annotations

from . import alphaedit as _alphaedit  # noqa: F401  (registers alphaedit)
from . import ft as _ft  # noqa: F401  (registers ft-l, ft-m)
from . import memit as _memit  # noqa: F401  (registers memit)
from . import rome as _rome  # noqa: F401  (registers rome)
from .alphaedit import AlphaEditHparams, AlphaEditState
from .api import (
    EditContext,
    apply_edit,
    get_method,
    method_names,
    register_method,
    resolved_settings,
)
from .delta import WeightDelta
from .digest import model_digest
from .errors import BaseModelMismatchError, DeltaStateError, NonFiniteUpdateError
from .ft import FtLHparams, FtMHparams
from .hparams import DEFAULT_LAYERS, ValueHparams
from .memit import MemitHparams
from .rome import RomeHparams
from .stats import (
    SAMPLE_STARTERS,
    ChainedText,
    KeyStatistics,
    ModelSampledText,
    TextList,
    TextSource,
    WikiBioPassages,
    default_statistics,
)
from .value_cache import ValueCache, value_cache

__all__ = [
    "DEFAULT_LAYERS",
    "SAMPLE_STARTERS",
    "AlphaEditHparams",
    "AlphaEditState",
    "BaseModelMismatchError",
    "ChainedText",
    "DeltaStateError",
    "EditContext",
    "FtLHparams",
    "FtMHparams",
    "KeyStatistics",
    "MemitHparams",
    "ModelSampledText",
    "NonFiniteUpdateError",
    "RomeHparams",
    "TextList",
    "TextSource",
    "ValueCache",
    "ValueHparams",
    "WeightDelta",
    "WikiBioPassages",
    "apply_edit",
    "default_statistics",
    "get_method",
    "method_names",
    "model_digest",
    "register_method",
    "resolved_settings",
    "value_cache",
]
