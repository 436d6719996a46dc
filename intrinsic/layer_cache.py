"""The blocks below an edited module, run once per layout of a value optimisation.

A value pass (:mod:`memedit.intrinsic.values`) adds the optimised vector to one module's
output in block ``L``; nothing below that block depends on it, and the tokens, positions and
masks of a layout stay the same from pass to pass. So block ``L - 1``'s output is kept from the
first pass of a layout and the passes after it start there: blocks ``0 .. L - 1`` are
replaced for the pass by stand-ins that each return the kept output (so the model's loop over
its blocks is unchanged), and only the blocks from ``L`` up run forward and backward. The kept
output is the one the full pass computed, so the result is the full pass's exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BelowCache", "block_index"]


def block_index(model: nn.Module, module_name: str) -> int | None:
    """The index of the transformer block that holds ``module_name`` (the block itself or a
    module inside it); None if it is in none."""
    from memedit.spec import ensure_spec, n_layers

    prefix = ensure_spec(model).layers
    for i in range(n_layers(model)):
        block = f"{prefix}.{i}"
        if module_name == block or module_name.startswith(block + "."):
            return i
    return None


class BelowCache:
    """Block ``L - 1``'s output for the layout last run, ``L`` being the block of the edited
    module; :meth:`run` records it on a layout's first pass and replays it after."""

    def __init__(self, model: nn.Module, module_name: str) -> None:
        from memedit.spec import ensure_spec

        layer = block_index(model, module_name)
        self.blocks: Any = model.get_submodule(ensure_spec(model).layers)
        self.count = 0 if layer is None else layer
        self.owner: object | None = None
        self.output: Any = None
        self.stand_ins: list[nn.Module] = []

    @contextmanager
    def run(self, owner: object) -> Iterator[None]:
        """Within the block, one forward pass of the layout ``owner`` (any object that names it:
        a new object is a new layout): recorded if it is the first, else replayed."""
        if not self.count:
            yield
        elif self.owner is owner and self.output is not None:
            with self._replay():
                yield
        else:
            self.owner, self.output, self.stand_ins = None, None, []
            seen: list[Any] = []
            last = self.blocks[self.count - 1]
            handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out))
            try:
                yield
            finally:
                handle.remove()
            if seen:
                self.owner, self.output = owner, _detached(seen[-1])
                kept = _kept_type()  # made once per layout, swapped in for every later pass
                self.stand_ins = [
                    kept(self.output, self.blocks[i], i == self.count - 1)
                    for i in range(self.count)
                ]

    @contextmanager
    def _replay(self) -> Iterator[None]:
        """Blocks ``0 .. L - 1`` swapped for stand-ins that return the kept output (their own
        hooks do not run again: their effect is in what was kept)."""
        originals = [self.blocks[i] for i in range(self.count)]
        try:
            for i, stand_in in enumerate(self.stand_ins):
                self.blocks[i] = stand_in
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block


@functools.cache
def _kept_type() -> type[nn.Module]:
    """The stand-in's class (made on first use: importing this module does not import torch)."""
    from torch import nn

    class Kept(nn.Module):
        """Stands in for a block: returns the kept output, whatever it is given; the last one
        a copy (what the blocks above receive, and may change in place), the others the kept
        output itself (the next stand-in ignores it)."""

        def __init__(self, output: Any, block: nn.Module, last: bool) -> None:
            super().__init__()
            self.output = output
            self.last = last
            if hasattr(block, "attention_type"):  # read by some models' block loops
                self.attention_type = block.attention_type

        def forward(self, *_args: Any, **_kwargs: Any) -> Any:
            return _cloned(self.output) if self.last else self.output

    return Kept


def _detached(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return (
            type(out)(*(_detached(o) for o in out))
            if hasattr(out, "_fields")
            else tuple(_detached(o) for o in out)
        )
    return out


def _cloned(out: Any) -> Any:
    """A copy a block's caller may change in place without touching the kept output."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_cloned(o) for o in out)
    return out
