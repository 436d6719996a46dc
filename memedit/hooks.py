"""Forward hooks that clean up after themselves.

Both helpers are context managers: they register their hooks on entry and remove exactly
those hooks on exit, also when the body raises. Hooks registered by anyone else are left alone.

    with trace(model, ["model.layers.3.mlp.down_proj"]) as tr:
        model(**batch)
    acts = tr["model.layers.3.mlp.down_proj"]

    with edit_output(model, "model.layers.3.mlp", lambda h: h * 0):
        model(**batch)              # layer 3's MLP contributes nothing here

    with edit_input(model, "model.layers.3", lambda h: cached):
        model(**batch)              # layer 3 reads ``cached`` instead of layer 2's output
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from memedit.errors import ModulePathError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

__all__ = ["Trace", "edit_input", "edit_output", "edit_output_given_input", "trace"]


def _primary(value: Any) -> Any:
    """The main tensor of a module output or input: the value itself, or its first item."""
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    return value


def _modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    if isinstance(names, str):
        names = [names]
    found: dict[str, nn.Module] = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            msg = f"{type(model).__name__} has no module {name!r}"
            raise ModulePathError(msg, path=name) from None
    return found


class Trace(Mapping[str, "torch.Tensor"]):
    """What :func:`trace` captured: module name → tensor of the most recent forward call.

    Indexing gives outputs (or inputs when only inputs were traced); ``inputs`` and
    ``outputs`` hold each side explicitly. A tuple output is reduced to its first item
    (the hidden states); an input is the first positional argument (or the first tensor
    keyword argument).
    """

    def __init__(self, names: Iterable[str], *, primary: str) -> None:
        self.names = tuple(names)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._primary = primary

    def _side(self) -> dict[str, torch.Tensor]:
        return self.outputs if self._primary == "outputs" else self.inputs

    def __getitem__(self, name: str) -> torch.Tensor:
        side = self._side()
        if name not in side:
            if name in self.names:
                msg = f"module {name!r} was traced but did not run inside the with-block"
            else:
                msg = f"module {name!r} was not traced (traced: {', '.join(self.names)})"
            raise KeyError(msg)
        return side[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._side())

    def __len__(self) -> int:
        return len(self._side())

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._side().items()}
        return f"Trace({self._primary}={shapes})"


def _remove(handles: list[RemovableHandle]) -> None:
    while handles:
        handles.pop().remove()


@contextmanager
def trace(
    model: nn.Module,
    module_names: Iterable[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
) -> Iterator[Trace]:
    """Capture the inputs and/or outputs of the named modules while the block runs.

    ``detach=False`` keeps the autograd graph (for gradients through the captured tensors).
    """
    import torch

    if not (inputs or outputs):
        msg = "trace() needs inputs=True or outputs=True (both are False)"
        raise ValueError(msg)
    modules = _modules(model, module_names)
    result = Trace(modules, primary="outputs" if outputs else "inputs")

    def keep(value: Any) -> Any:
        value = _primary(value)
        if detach and isinstance(value, torch.Tensor):
            return value.detach()
        return value

    handles: list[RemovableHandle] = []
    try:
        for name, module in modules.items():
            if inputs:

                def pre_hook(
                    _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
                ) -> None:
                    if args:
                        result.inputs[name] = keep(args[0])
                    else:
                        tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
                        if tensors:
                            result.inputs[name] = keep(tensors[0])

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if outputs:

                def hook(_m: nn.Module, _args: Any, output: Any, name: str = name) -> None:
                    result.outputs[name] = keep(output)

                handles.append(module.register_forward_hook(hook))
        yield result
    finally:
        _remove(handles)


@contextmanager
def edit_output(
    model: nn.Module,
    module_name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[nn.Module]:
    """Replace the output of ``module_name`` by ``fn(output)`` while the block runs.

    For a module that returns a tuple, ``fn`` receives and replaces the first item and the
    rest is passed through unchanged. Yields the hooked module.
    """
    module = _modules(model, [module_name])[module_name]

    def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple) and output:
            return (fn(output[0]), *output[1:])
        return fn(output)

    handles = [module.register_forward_hook(hook)]
    try:
        yield module
    finally:
        _remove(handles)


@contextmanager
def edit_input(
    model: nn.Module,
    module_name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[nn.Module]:
    """Replace the main input of ``module_name`` by ``fn(input)`` while the block runs.

    The main input is the first positional argument, or else the first tensor keyword
    argument (as :func:`trace` reads it); other arguments pass through. Yields the module.
    """
    import torch

    module = _modules(model, [module_name])[module_name]

    def pre_hook(
        _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                return args, {**kwargs, key: fn(value)}
        msg = f"module {module_name!r} was called without a tensor input to replace"
        raise ValueError(msg)

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        yield module
    finally:
        _remove(handles)


@contextmanager
def edit_output_given_input(
    model: nn.Module,
    module_name: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Replace the output of ``module_name`` by ``fn(its main input, its output)`` while the
    block runs: :func:`edit_input` keeps the input (unchanged) for :func:`edit_output`."""
    kept: list[torch.Tensor] = []

    def keep(inputs: torch.Tensor) -> torch.Tensor:
        kept[:] = [inputs]
        return inputs

    def change(out: torch.Tensor) -> torch.Tensor:
        return fn(kept[0], out)

    with edit_input(model, module_name, keep), edit_output(model, module_name, change):
        try:
            yield
        finally:
            kept.clear()
