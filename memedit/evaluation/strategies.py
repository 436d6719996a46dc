"""How the evaluator applies and reverts edits: strategies by name, with no method-specific code.

A strategy spec is ``name`` or ``name:method`` with optional ``key=value`` options after a
``@`` (``weights:rome@layer=4``). ``unedited`` applies nothing (the pre-edit baseline); every
other name is a strategy of `EditableModel.edit` (``memory`` now; ``adapter`` and ``weights``
when their issues land): the evaluator hands the requests to the wrapper and reverts through
`EditableModel.rollback`, so a new method is measured without a line changed here.
Other strategies can be plugged in with :func:`register_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from memedit.errors import InvalidRequestError
from memedit.types import DEFAULT_WEIGHTS_METHOD, EditRequest

if TYPE_CHECKING:
    from memedit.editable import EditableModel

__all__ = [
    "Applied",
    "EvalStrategy",
    "WrapperStrategy",
    "parse_strategy",
    "register_strategy",
    "weights_digest",
]


class Applied(Protocol):
    """Edits that landed; `revert` undoes exactly them."""

    def revert(self) -> None: ...


class EvalStrategy(Protocol):
    """What the evaluator needs of a strategy."""

    @property
    def name(self) -> str: ...

    def config(self) -> dict[str, Any]: ...

    def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Applied: ...


@dataclass
class _NothingApplied:
    def revert(self) -> None:
        return None


@dataclass
class _WrapperApplied:
    em: EditableModel
    ids: list[int]

    def revert(self) -> None:
        # newest first, so layered edits (weights, adapters) unwind in order; rolling back one
        # edit of an in-weight batch rolls the whole batch back, so its other ids are done
        while self.ids:
            if self.em.memory.get(self.ids[-1]).active:
                self.em.rollback(self.ids[-1])
            self.ids.pop()


@dataclass(frozen=True)
class Unedited:
    """The model as it is: the reference every edit is compared against."""

    name: str = "unedited"

    def config(self) -> dict[str, Any]:
        return {"strategy": "unedited"}

    def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Applied:
        return _NothingApplied()


@dataclass(frozen=True)
class WrapperStrategy:
    """Edits through `EditableModel.edit(requests, strategy=...)`, reverted by rollback."""

    strategy: str
    method: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.strategy}:{self.method}" if self.method else self.strategy

    def config(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "method": self.method, "options": dict(self.options)}

    def settings(self, em: EditableModel) -> dict[str, Any] | None:
        """Every hyperparameter an in-weight or adapter edit will use on ``em``'s model,
        defaults and layers filled in (a run's manifest keeps it, so a resumed run refuses to
        mix in records made under changed defaults); None for the memory strategy, whose
        settings are the wrapper's, and for a model the wrapper does not hold."""
        if em.model is None:
            return None
        options = dict(self.options) or None
        if self.strategy == "weights":
            from memedit.intrinsic import resolved_settings

            method = self.method or DEFAULT_WEIGHTS_METHOD
            return resolved_settings(method, options, em.model)
        if self.strategy == "adapter":
            from memedit.adapter_edits import DEFAULT_METHOD
            from memedit.adapters import adapter_settings

            return adapter_settings(self.method or DEFAULT_METHOD, options, em.model)
        return None

    def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Applied:
        kwargs: dict[str, Any] = dict(self.options)
        if self.method:
            kwargs["method"] = self.method
        records = em.edit(list(requests), strategy=self.strategy, **kwargs)
        return _WrapperApplied(em, [r.id for r in records])


StrategyFactory = Callable[[str, Mapping[str, Any]], EvalStrategy]
_REGISTRY: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory) -> None:
    """Make ``name`` usable in strategy specs; `factory(method, options)` builds it."""
    if not name or ":" in name or "@" in name or "," in name:
        msg = f"strategy name must be non-empty without ':', '@' or ',', got {name!r}"
        raise InvalidRequestError(msg, field="name", value=name)
    _REGISTRY[name] = factory


def _option_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_strategy(spec: str) -> EvalStrategy:
    """Build the strategy a spec names (``memory``, ``unedited``, ``weights:rome@layer=4``)."""
    from memedit.types import STRATEGIES

    if not isinstance(spec, str) or not spec.strip():
        msg = f"a strategy spec must be a non-empty string, got {spec!r}"
        raise InvalidRequestError(msg, field="strategies", value=spec)
    head, _, opts = spec.strip().partition("@")
    name, _, method = head.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(";")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            msg = f"strategy option {item!r} in {spec!r} must look like key=value"
            raise InvalidRequestError(msg, field="strategies", value=spec)
        options[key.strip()] = _option_value(value.strip())
    if name in _REGISTRY:
        return _REGISTRY[name](method, options)
    if name == "unedited":
        if method or options:
            msg = f"'unedited' takes no method or options, got {spec!r}"
            raise InvalidRequestError(msg, field="strategies", value=spec)
        return Unedited()
    if name in STRATEGIES:
        return WrapperStrategy(name, method, options)
    known = sorted({"unedited", *STRATEGIES, *_REGISTRY})
    msg = f"unknown strategy {name!r} in {spec!r}; known: {known}"
    raise InvalidRequestError(msg, field="strategies", value=spec)


def weights_digest(model: Any) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes): equal digests
    before an edit and after its revert mean the weights were restored bit for bit. The same
    digest as ``memedit.intrinsic.model_digest`` (memoised while the weights do not change)."""
    from memedit.intrinsic import model_digest

    return model_digest(model)
