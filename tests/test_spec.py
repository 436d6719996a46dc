"""ModelSpec registry: every registered architecture resolves on a tiny random model,
GPT-2's transposed Conv1D weights come back as (out, in), unknown types explain how to
register one."""

from __future__ import annotations

import pytest
import torch

import memedit.spec as spec_mod
from memedit.errors import ModulePathError, UnknownArchitectureError
from memedit.spec import (
    ModelSpec,
    ensure_spec,
    get_spec,
    hidden_size,
    n_layers,
    register_spec,
    resolve,
    weight_matrix,
)

from .tiny_models import TYPES, tiny_model


@pytest.mark.parametrize("model_type", TYPES)
def test_every_registered_family_resolves(model_type: str) -> None:
    model = tiny_model(model_type)
    spec = ensure_spec(model)
    assert spec is get_spec(model_type)
    assert n_layers(model) == 2
    assert hidden_size(model) == 64
    for layer in (0, 1):
        down = resolve(model, spec.mlp_out, layer)
        w = weight_matrix(model, spec.mlp_out.format(layer=layer))
        assert w.shape[0] == 64, "mlp_out writes the residual stream: out_features == hidden"
        assert down is resolve(model, spec.layers)[layer].get_submodule(
            spec.mlp_out.format(layer=layer).split(f"{layer}.", 1)[1]
        )
        for template in spec.mlp_in:
            assert weight_matrix(model, template.format(layer=layer)).shape[1] == 64
    emb = resolve(model, spec.embed)
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape == (128, 64)


def test_all_required_families_registered() -> None:
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gpt2"):
        assert isinstance(get_spec(model_type), ModelSpec)


def test_gpt2_conv1d_weight_is_returned_as_out_in_view() -> None:
    model = tiny_model("gpt2")
    spec = ensure_spec(model)
    assert spec.transposed
    name = spec.mlp_in[0].format(layer=0)  # c_fc: 64 -> 256, stored (64, 256)
    conv = model.get_submodule(name)
    assert conv.weight.shape == (64, 256)
    w = weight_matrix(model, name)
    assert w.shape == (256, 64)
    # Same convention as nn.Linear: y = x @ W.T + b
    x = torch.randn(3, 64)
    lin = torch.nn.Linear(64, 256)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(conv.bias)
        torch.testing.assert_close(lin(x), conv(x))
    # It is a view: writing through it changes the parameter.
    with torch.no_grad():
        w[5, 7] = 42.0
    assert conv.weight[7, 5].item() == 42.0


def test_linear_weight_matrix_is_the_weight_itself() -> None:
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"
    w = weight_matrix(model, name)
    assert w.shape == (64, 128)
    assert w.data_ptr() == model.get_submodule(name).weight.data_ptr()


def test_unknown_architecture_says_how_to_register() -> None:
    model = tiny_model("llama")
    model.config.model_type = "brandnew"
    with pytest.raises(UnknownArchitectureError) as info:
        ensure_spec(model)
    text = str(info.value)
    assert "'brandnew'" in text
    assert "memedit.spec.register_spec('brandnew', ModelSpec(" in text
    assert "llama" in text  # lists the known types


def test_register_spec_makes_a_new_type_loadable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_mod, "_REGISTRY", dict(spec_mod._REGISTRY))
    model = tiny_model("llama")
    model.config.model_type = "mylm"
    register_spec("mylm", ModelSpec())
    assert ensure_spec(model) is get_spec("mylm")
    with pytest.raises(ValueError, match="model_type"):
        register_spec("", ModelSpec())
    with pytest.raises(TypeError, match="ModelSpec"):
        register_spec("x", object())  # type: ignore[arg-type]


def test_template_that_does_not_resolve_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_mod, "_REGISTRY", dict(spec_mod._REGISTRY))
    register_spec("llama", ModelSpec(mlp_out="model.layers.{layer}.mlp.out_proj"))
    with pytest.raises(ModulePathError) as info:
        ensure_spec(tiny_model("llama"))
    assert info.value.path == "model.layers.0.mlp.out_proj"
    assert "model.layers.0.mlp.out_proj" in str(info.value)


def test_resolve_needs_a_layer_for_layer_templates() -> None:
    model = tiny_model("qwen2")
    with pytest.raises(ModulePathError, match="layer"):
        resolve(model, "model.layers.{layer}.mlp")
    assert resolve(model, "model.layers.{layer}.mlp", 1) is model.model.layers[1].mlp


def test_spec_validation_and_default_edit_layers() -> None:
    with pytest.raises(ValueError, match="mlp_out"):
        ModelSpec(mlp_out=" ")
    with pytest.raises(ValueError, match="mlp_in"):
        ModelSpec(mlp_in="model.layers.{layer}.mlp.up_proj")  # type: ignore[arg-type]
    spec = ModelSpec()
    assert spec.edit_layers(30, "rome") == (6,)
    assert spec.edit_layers(30, "memit") == (3, 4, 5, 6, 7, 8)
    assert ModelSpec(rome_layer=4).edit_layers(30, "rome") == (4,)
    assert ModelSpec(memit_layers=(1, 2)).edit_layers(30, "memit") == (1, 2)
    with pytest.raises(ValueError, match="method"):
        spec.edit_layers(30, "mend")  # type: ignore[arg-type]
