"""What every adapter method provides, and the registry the wrapper finds them in.

An adapter holds edits *beside* the model's weights (a GRACE codebook, a LoRA module, ...) and
changes the model's outputs only while :meth:`Adapter.active` is entered. The wrapper
(`EditableModel`, strategy ``adapter``) drives every method through this protocol and never
looks at a method's name:

1. ``payloads = adapter.prepare(tokenizer, requests, hparams)`` trains the edits without
   changing what the adapter answers; one payload (bytes) per request;
2. the payloads go into the SQL edit log with the edits, which assigns their ids;
3. ``adapter.commit(ids, payloads)`` makes them active. Reopening a memory calls ``commit``
   with the logged payloads, so a restored adapter is the one that was saved;
4. ``adapter.remove(edit_id)`` undoes one edit exactly.

A method registers itself with one line at the bottom of its module::

    register_adapter("grace", GraceAdapter)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memedit.errors import InvalidRequestError, MemeditError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = [
    "Adapter",
    "AdapterError",
    "NonFiniteAdapterError",
    "adapter_names",
    "adapter_settings",
    "get_adapter",
    "register_adapter",
]


class AdapterError(MemeditError, RuntimeError):
    """An adapter edit could not be applied or undone (nothing was changed)."""


class NonFiniteAdapterError(AdapterError, FloatingPointError):
    """Training produced NaN or Inf adapter values; the edit was refused, nothing changed."""


class Adapter(Protocol):
    """One method's adapter state on one model."""

    def prepare(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: Any = None,
    ) -> list[bytes]:
        """Train the edits (one payload per request) without activating them."""
        ...

    def commit(self, edit_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Make prepared (or logged) edits active under their edit ids."""
        ...

    def remove(self, edit_id: int) -> None:
        """Undo one edit; the adapter then answers as if it had never been committed."""
        ...

    def edit_ids(self) -> list[int]:
        """The ids of the committed edits, in id order."""
        ...

    def active(self) -> AbstractContextManager[Any]:
        """Context in which the model runs with the committed edits (hooks removed on exit)."""
        ...


AdapterFactory = Callable[["nn.Module"], Adapter]


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: AdapterFactory


_ADAPTERS: dict[str, _Entry] = {}


def register_adapter(name: str, factory: AdapterFactory) -> None:
    """Make ``name`` usable as ``EditableModel.edit(..., strategy="adapter", method=name)``
    (and as ``adapter:NAME`` in the evaluator). ``factory(model)`` builds an empty adapter."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ":@,; "):
        msg = f"adapter name must be non-empty without ':', '@', ',', ';' or spaces, got {name!r}"
        raise InvalidRequestError(msg, field="method", value=name)
    _ADAPTERS[name] = _Entry(name, factory)


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(name: str) -> AdapterFactory:
    """The factory registered as ``name``."""
    try:
        return _ADAPTERS[name].factory
    except KeyError:
        msg = f"unknown adapter method {name!r}; known: {adapter_names()}"
        raise InvalidRequestError(msg, field="method", value=name) from None


def adapter_settings(name: str, hparams: Any, model: nn.Module) -> dict[str, Any] | None:
    """Every hyperparameter an edit of adapter ``name`` with ``hparams`` (None, the method's
    dataclass or a mapping of its fields) will use on ``model``, as plain JSON values, with
    where it goes resolved (``placement``: the default layer a fraction of the depth picks).
    An evaluation run records it so a resumed run never mixes records made under a changed
    default. None for a method that names no ``hparams_type`` (its settings are unknown)."""
    from memedit.intrinsic.hparams import as_json, from_options

    hp_type = getattr(get_adapter(name), "hparams_type", None)
    if hp_type is None:
        return None
    hp = from_options(hp_type, hparams)
    out = as_json(hp)
    placement = getattr(hp, "placement", None)
    if callable(placement):
        out.update(placement(model))
    return out


def check_hparams(owner: str, layer: object, checks: dict[str, bool], values: object) -> None:
    """Refuse hyperparameters: `layer` must be None or a non-negative int, and every entry of
    `checks` (field name -> is it in range) must hold; the error names ``owner.field``."""
    if layer is not None and (not isinstance(layer, int) or layer < 0):
        msg = f"{owner}.layer must be a non-negative integer, got {layer!r}"
        raise InvalidRequestError(msg, field="layer", value=layer)
    for name, ok in checks.items():
        if not ok:
            value = getattr(values, name)
            msg = f"{owner}.{name} is out of range: {value!r}"
            raise InvalidRequestError(msg, field=name, value=value)


def resolve_layer(owner: str, layer: int | None, fraction: float, count: int) -> int:
    """The block an adapter sits at: `layer` if given (refused past the model's `count`
    blocks), else `fraction` of the depth, clamped to the last block."""
    if layer is not None and layer >= count:
        msg = f"{owner}.layer={layer} but the model has {count} layers"
        raise InvalidRequestError(msg, field="layer", value=layer)
    chosen = layer if layer is not None else round(fraction * count)
    return min(chosen, count - 1)
