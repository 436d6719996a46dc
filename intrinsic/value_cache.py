"""Optimised target values kept on disk, keyed by everything they depend on.

The value optimisation (:func:`~memedit.intrinsic.values.optimise_values`) is nearly all of an
in-weight edit's time on a CPU (ROME, MEMIT, AlphaEdit: 6-30 s per request on the 2-core
machine, against a second for keys and solves). A long sequential chain (T = 500) re-applied
in a later sitting spends that time again for the same numbers. Inside ``with
value_cache(directory):`` every value optimised is written to ``directory`` and looked up
before optimising: the key is a sha256 of the exact model weights at that moment
(:func:`~memedit.intrinsic.digest.model_digest`), the module, the request's prompt, target
and subject, the context prefixes, the value hyperparameters, the device type and the
tokenizer, so a hit is the value this computation gives (a changed model, request or setting
is a miss, never a stale hit). Re-applying a chain whose every earlier step is reproduced bit
for bit therefore hits at every step; on a machine whose arithmetic differs the digests differ
and the values are computed again.

A caller that knows what determines the weights may set :attr:`ValueCache.context` instead:
the key then holds that text in place of the weights digest. The evaluator's sequential mode
sets it to the run (base model digest, configuration), the strategy and how many cases of the
chain precede the edit, so a chain re-applied on a machine whose arithmetic differs in the last
bits still reuses its values (each one the value optimised on that chain's state there, which
differs from this machine's by rounding only).

Files: ``<directory>/<key[:2]>/<key>.safetensors`` (the ``init`` and ``target`` vectors; loss,
NLL and steps in the metadata), about 5 KB each for SmolLM2-135M.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

    from .hparams import ValueHparams
    from .values import ValueResult

__all__ = ["ValueCache", "active_value_cache", "value_cache"]

log = logging.getLogger(__name__)

FORMAT = "memedit-value"
VERSION = "1"

_ACTIVE: ContextVar[ValueCache | None] = ContextVar("memedit_value_cache", default=None)


#: Value settings added after the key format was fixed, with their defaults: at its default
#: such a setting is left out of the key, so values stored before it existed still match.
LATER_FIELDS: dict[str, object] = {
    "after_factor": 0.0,
    "stop_at_argmax": False,
    "bare_until": 0.0,
    "value_dtype": "model",
    "general_weight": 0.0,  # AlphaEdit's: a solve setting, not the value's
}


class ValueCache:
    """One directory of optimised values (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], context: str | None = None) -> None:
        self.directory = Path(directory)
        #: What determines the model's weights, in place of their digest (None: the digest).
        self.context = context
        self.hits = 0
        self.misses = 0

    def key(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        module_name: str,
        prefixes: Sequence[str],
        hp: ValueHparams,
    ) -> str:
        from .compute import model_device
        from .digest import model_digest

        described = {
            "format": FORMAT,
            "version": VERSION,
            "model": model_digest(model) if self.context is None else None,
            "context": self.context,
            "module": module_name,
            "request": [request.prompt, request.target_new, request.subject],
            "prefixes": list(prefixes),
            "hparams": {
                k: repr(v)
                for k, v in sorted(dataclasses.asdict(hp).items())
                if not (k in LATER_FIELDS and v == LATER_FIELDS[k])
            },
            "hparams_type": type(hp).__name__,
            "device": model_device(model).type,
            "tokenizer": [type(tokenizer).__name__, len(tokenizer)],
        }
        text = json.dumps(described, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | str = "cpu") -> ValueResult | None:
        """The stored value of ``key`` (tensors on ``device``), or None."""
        from safetensors import safe_open

        from .values import ValueResult

        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                log.warning("ignoring %s: not a %s file for this key", path, FORMAT)
                self.misses += 1
                return None
            init, target = f.get_tensor("init").to(device), f.get_tensor("target").to(device)
        self.hits += 1
        return ValueResult(
            init, target, float(meta["loss"]), float(meta["nll"]), int(meta["steps"])
        )

    def put(self, key: str, value: ValueResult) -> None:
        """Store ``value`` under ``key`` (atomically)."""
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "init": value.init.detach().float().cpu().contiguous(),
            "target": value.target.detach().float().cpu().contiguous(),
        }
        meta = {
            "format": FORMAT,
            "key": key,
            "loss": repr(value.loss),
            "nll": repr(value.nll),
            "steps": str(value.steps),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)


def active_value_cache() -> ValueCache | None:
    """The cache of the innermost ``with value_cache(...)`` block, if any."""
    return _ACTIVE.get()


@contextmanager
def value_cache(
    directory: str | os.PathLike[str], context: str | None = None
) -> Iterator[ValueCache]:
    """Within the block, optimised values are read from and written to ``directory``."""
    cache = ValueCache(directory, context)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
