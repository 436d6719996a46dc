"""One entry point for every in-weight method, and the registry behind it.

    delta = apply_edit("rome", model, tokenizer, [request])          # -> WeightDelta
    delta.revert()

A method registers itself with one line at the bottom of its module::

    register_method("rome", RomeHparams, edit_rome)

where ``edit_rome(ctx)`` writes into ``ctx.delta`` and ``RomeHparams`` is a frozen dataclass
with a ``layers`` field and a ``layer_role`` class attribute (see ``hparams.py``). Nothing here
(or anywhere outside the method's module) looks at a method's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError
from memedit.types import EditRequest

from .delta import WeightDelta, request_summary
from .hparams import as_json, for_model, from_options

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from .stats import KeyStatistics

__all__ = [
    "EditContext",
    "Method",
    "apply_edit",
    "get_method",
    "method_names",
    "register_method",
    "resolve_hparams",
    "resolved_settings",
]


@dataclass(frozen=True)
class EditContext:
    """What a method's edit function receives: the model, the requests, its hyperparameters
    (``layers`` filled in), the delta to write into, the key statistics provider and the
    caller's ``state`` object carried across calls (only for a method registered with a state
    type, e.g. AlphaEdit's preserved keys; else None)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    requests: Sequence[EditRequest]
    hparams: Any
    delta: WeightDelta
    stats: KeyStatistics
    state: Any = None


EditFn = Callable[[EditContext], None]


@dataclass(frozen=True)
class Method:
    name: str
    hparams: type
    edit: EditFn
    state: type | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, hparams: type, edit: EditFn, *, state: type | None = None) -> None:
    """Make ``name`` usable in :func:`apply_edit` (and as ``weights:NAME`` in the evaluator).
    ``state``: the type of the object a caller may pass as ``apply_edit(..., state=)``."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ":@,; "):
        msg = f"method name must be non-empty without ':', '@', ',', ';' or spaces, got {name!r}"
        raise InvalidRequestError(msg, field="method", value=name)
    if not dataclasses.is_dataclass(hparams) or not any(
        f.name == "layers" for f in dataclasses.fields(hparams)
    ):
        msg = f"{name}: hparams must be a dataclass with a 'layers' field, got {hparams!r}"
        raise TypeError(msg)
    _METHODS[name] = Method(name, hparams, edit, state)


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        msg = f"unknown in-weight method {name!r}; known: {method_names()}"
        raise InvalidRequestError(msg, field="method", value=name) from None


def resolve_hparams(method: str, hparams: Any, model: nn.Module) -> Any:
    """The method's hyperparameters from ``None``/an instance/a mapping of field values, with
    ``layers`` filled in for ``model``."""
    return for_model(from_options(get_method(method).hparams, hparams), model)


def resolved_settings(method: str, hparams: Any, model: nn.Module) -> dict[str, Any]:
    """Every field of :func:`resolve_hparams`'s result as plain JSON values (tuples as lists):
    what an edit with ``hparams`` will use on ``model``, defaults and layers included. An
    evaluation run records it, so records made under one default are never mixed with those
    of a changed one."""
    return as_json(resolve_hparams(method, hparams, model))


def apply_edit(
    method: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: EditRequest | Sequence[EditRequest],
    hparams: Any = None,
    *,
    stats: KeyStatistics | None = None,
    state: Any = None,
) -> WeightDelta:
    """Edit ``model`` in place with ``method``; returns the reversible :class:`WeightDelta`.

    ``hparams``: ``None`` (defaults), the method's hyperparameter dataclass, or a mapping of
    its fields (``{"layer": 4}``). ``stats``: where key statistics come from and are cached
    (default: :func:`~memedit.intrinsic.stats.default_statistics`, WikiBio text). If anything
    fails midway, every weight already written is restored before the exception propagates.
    ``state``: for a method registered with a state type, the caller's object carried across
    calls (AlphaEdit: an ``AlphaEditState``); other methods refuse one.
    """
    from .stats import default_statistics

    entry = get_method(method)
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not reqs:
        msg = "apply_edit needs at least one EditRequest"
        raise InvalidRequestError(msg, field="requests", value=requests)
    for i, r in enumerate(reqs):
        if not isinstance(r, EditRequest):
            msg = f"requests[{i}] must be an EditRequest, got {type(r).__name__}"
            raise InvalidRequestError(msg, field=f"requests[{i}]", value=r)
    if state is not None and (entry.state is None or not isinstance(state, entry.state)):
        wanted = "no state" if entry.state is None else f"a {entry.state.__name__}"
        msg = f"{method} takes {wanted} as state, got {type(state).__name__}"
        raise InvalidRequestError(msg, field="state", value=state)
    hp = resolve_hparams(method, hparams, model)
    with WeightDelta.record(
        model,
        entry.name,
        hparams=as_json(hp),
        layers=hp.layers,
        requests=[request_summary(r) for r in reqs],
    ) as delta:
        ctx = EditContext(model, tokenizer, reqs, hp, delta, stats or default_statistics(), state)
        entry.edit(ctx)
    return delta
