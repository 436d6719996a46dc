"""Run a model's residual stream from a given layer on, with a hidden state supplied there.

Restoring a clean state at layer L (or over a window starting at L) leaves every layer below
L exactly as in the corrupted run, so a restoration run needs only the layers from L on:
:func:`run_from` swaps the layers below ``start`` for pass-through modules and feeds layer
``start`` (or the final norm, when ``start`` is the number of layers) the given state. The
swap is undone in ``finally``; the caller checks once per fact that it reproduces the full
forward pass (:func:`memedit.locate.trace.trace_fact` does) before relying on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from memedit.hooks import edit_input
from memedit.spec import resolve

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["run_from", "skip_layers", "stream_entry"]


@lru_cache(maxsize=1)
def _passthrough() -> type[nn.Module]:
    from torch import nn

    class Passthrough(nn.Module):
        """Stands in for a skipped decoder layer: returns its hidden-state input unchanged."""

        def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
            return hidden_states

    return Passthrough


@contextmanager
def skip_layers(model: nn.Module, spec: Any, start: int) -> Iterator[None]:
    """Within the block, layers ``0 .. start-1`` of ``spec.layers`` pass their input through."""
    layers: Any = resolve(model, spec.layers)
    originals = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _passthrough()()
        yield
    finally:
        for i, module in enumerate(originals):
            layers[i] = module


def stream_entry(spec: Any, start: int, count: int) -> str:
    """Module whose input is the residual stream before layer ``start`` (the final norm for
    ``start == count``)."""
    return str(spec.final_norm) if start == count else f"{spec.layers}.{start}"


@contextmanager
def run_from(
    model: nn.Module, spec: Any, start: int, count: int, state: torch.Tensor
) -> Iterator[None]:
    """Within the block, a forward pass skips layers below ``start`` and layer ``start`` reads
    ``state`` (batch, tokens, hidden) as its input; hooks on later modules still apply."""
    with ExitStack() as stack:
        stack.enter_context(edit_input(model, stream_entry(spec, start, count), lambda _h: state))
        stack.enter_context(skip_layers(model, spec, start))
        yield
