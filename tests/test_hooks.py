"""Hook helpers capture and replace what they should, and leave no hook behind, also when
the with-block raises; foreign hooks survive."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memedit.errors import ModulePathError
from memedit.hooks import edit_output, trace

from .tiny_models import tiny_model

MLP = "model.layers.1.mlp"
LAYER0 = "model.layers.0"


def _hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


@pytest.fixture
def model() -> Any:
    return tiny_model("llama")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 17, 33]])


def test_trace_captures_outputs_and_inputs(model: Any, ids: torch.Tensor) -> None:
    with trace(model, [MLP, LAYER0], inputs=True) as tr:
        logits = model(ids).logits
    assert set(tr) == {MLP, LAYER0}
    assert tr[MLP].shape == (1, 5, 64)
    assert tr.inputs[MLP].shape == (1, 5, 64)
    # A decoder layer's output feeds the next layer: layer 0 output == layer 1 input.
    with trace(model, ["model.layers.1"], inputs=True) as tr1:
        model(ids)
    torch.testing.assert_close(tr1.inputs["model.layers.1"], tr[LAYER0])
    # Captured MLP output equals calling the MLP on the captured input.
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(MLP)(tr.inputs[MLP]), tr[MLP])
    assert not tr[MLP].requires_grad
    assert logits.requires_grad


def test_trace_detach_false_keeps_graph(model: Any, ids: torch.Tensor) -> None:
    with trace(model, [MLP], detach=False) as tr:
        model(ids)
    assert tr[MLP].requires_grad
    tr[MLP].sum().backward()
    assert model.get_submodule(MLP).down_proj.weight.grad is not None


def test_trace_errors(model: Any) -> None:
    with (
        pytest.raises(ValueError, match="inputs=True or outputs=True"),
        trace(model, [MLP], outputs=False),
    ):
        pass
    with pytest.raises(ModulePathError) as info, trace(model, [MLP, "model.nope"]):
        pass
    assert info.value.path == "model.nope"
    assert _hook_counts(model) == {}
    with trace(model, [MLP]) as tr:
        pass
    with pytest.raises(KeyError, match="did not run"):
        tr[MLP]
    with pytest.raises(KeyError, match="was not traced"):
        tr[LAYER0]


def test_edit_output_replaces_then_restores(model: Any, ids: torch.Tensor) -> None:
    with torch.no_grad():
        before = model(ids).logits
        with edit_output(model, MLP, torch.zeros_like) as module:
            assert module is model.get_submodule(MLP)
            with trace(model, [MLP]) as tr:
                edited = model(ids).logits
        after = model(ids).logits
    assert torch.count_nonzero(tr[MLP]) == 0  # trace sees the replaced output
    assert not torch.allclose(before, edited)
    assert torch.equal(before, after)


def test_edit_output_on_a_tuple_output_keeps_the_rest(model: Any, ids: torch.Tensor) -> None:
    attn = "model.layers.0.self_attn"  # returns (hidden, weights)
    with torch.no_grad(), edit_output(model, attn, lambda h: h * 0.0), trace(model, [attn]) as tr:
        model(ids)
    assert torch.count_nonzero(tr[attn]) == 0


@pytest.mark.parametrize("helper", ["trace", "trace_inputs", "edit_output"])
def test_no_hook_left_behind_even_on_error(model: Any, ids: torch.Tensor, helper: str) -> None:
    foreign_calls: list[int] = []
    foreign_module = model.get_submodule(MLP)
    foreign = foreign_module.register_forward_hook(lambda *_: foreign_calls.append(1))
    foreign_pre = foreign_module.register_forward_pre_hook(lambda *_: None)
    before = _hook_counts(model)
    assert before == {MLP: (1, 1, 0)}

    def ctx() -> Any:
        if helper == "trace":
            return trace(model, [MLP, LAYER0])
        if helper == "trace_inputs":
            return trace(model, [MLP, LAYER0], inputs=True)
        return edit_output(model, MLP, lambda h: h + 1)

    with ctx():
        assert _hook_counts(model) != before
        model(ids)
    assert _hook_counts(model) == before

    with pytest.raises(RuntimeError, match="boom"), ctx():
        model(ids)
        raise RuntimeError("boom")
    assert _hook_counts(model) == before

    # The foreign hooks are the very same objects and still fire.
    assert foreign.id in foreign_module._forward_hooks
    assert foreign_pre.id in foreign_module._forward_pre_hooks
    n = len(foreign_calls)
    model(ids)
    assert len(foreign_calls) == n + 1
    foreign.remove()
    foreign_pre.remove()
    assert _hook_counts(model) == {}
