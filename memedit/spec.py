"""Address a model's modules by role instead of by family-specific attribute names.

One :class:`ModelSpec` per ``config.model_type`` maps abstract roles (MLP output of layer N,
embedding, final norm, ...) to module path templates such as
``model.layers.{layer}.mlp.down_proj``. Templates are plain module paths resolved with
``get_submodule``; :func:`ensure_spec` checks at load time that every one of them resolves.

Add an architecture with::

    memedit.spec.register_spec("phi", ModelSpec(layers="model.layers", ...))
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from memedit.errors import ModulePathError, UnknownArchitectureError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ModelSpec",
    "cache_keyword",
    "ensure_spec",
    "get_spec",
    "hidden_size",
    "n_layers",
    "register_spec",
    "registered_types",
    "resolve",
    "returned_cache",
    "weight_matrix",
]

EditMethod = Literal["rome", "memit"]


@dataclass(frozen=True)
class ModelSpec:
    """Module path templates of one architecture; ``{layer}`` stands for the layer index.

    ``transposed`` is True where the family stores projection weights as (in, out)
    (GPT-2's ``Conv1D``); :func:`weight_matrix` hides the difference.
    ``rome_layer`` / ``memit_layers`` are placeholder defaults (fractions of the depth
    when left as None) to be tuned per model.
    """

    layers: str = "model.layers"
    mlp_in: tuple[str, ...] = (
        "model.layers.{layer}.mlp.gate_proj",
        "model.layers.{layer}.mlp.up_proj",
    )
    mlp_out: str = "model.layers.{layer}.mlp.down_proj"
    attn_out: str = "model.layers.{layer}.self_attn.o_proj"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    n_layers_attr: str = "num_hidden_layers"
    hidden_size_attr: str = "hidden_size"
    transposed: bool = False
    rome_layer: int | None = None
    memit_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and not value.strip():
                msg = f"ModelSpec.{f.name} must be a non-empty module path, got {value!r}"
                raise ValueError(msg)
        if isinstance(self.mlp_in, str) or not self.mlp_in:
            msg = f"ModelSpec.mlp_in must be a non-empty tuple of templates, got {self.mlp_in!r}"
            raise ValueError(msg)

    def templates(self) -> dict[str, str]:
        """Role name → template, for every module role (``mlp_in`` as ``mlp_in[i]``)."""
        out = {f"mlp_in[{i}]": t for i, t in enumerate(self.mlp_in)}
        for role in ("mlp_out", "attn_out", "embed", "final_norm", "lm_head", "layers"):
            out[role] = getattr(self, role)
        return out

    def edit_layers(self, num_layers: int, method: EditMethod) -> tuple[int, ...]:
        """Default layers for ROME (one) or MEMIT (a run) on a model with ``num_layers``."""
        if method == "rome":
            if self.rome_layer is not None:
                return (self.rome_layer,)
            return (max(0, round(num_layers * 0.2)),)
        if method == "memit":
            if self.memit_layers is not None:
                return self.memit_layers
            lo, hi = round(num_layers * 0.1), round(num_layers * 0.3)
            return tuple(range(lo, max(hi, lo + 1)))
        msg = f"method must be 'rome' or 'memit', got {method!r}"
        raise ValueError(msg)


_LLAMA_LIKE = ModelSpec()

_REGISTRY: dict[str, ModelSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": ModelSpec(
        layers="model.language_model.layers",
        mlp_in=(
            "model.language_model.layers.{layer}.mlp.gate_proj",
            "model.language_model.layers.{layer}.mlp.up_proj",
        ),
        mlp_out="model.language_model.layers.{layer}.mlp.down_proj",
        attn_out="model.language_model.layers.{layer}.self_attn.o_proj",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
    ),
    "gpt2": ModelSpec(
        layers="transformer.h",
        mlp_in=("transformer.h.{layer}.mlp.c_fc",),
        mlp_out="transformer.h.{layer}.mlp.c_proj",
        attn_out="transformer.h.{layer}.attn.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        n_layers_attr="n_layer",
        hidden_size_attr="n_embd",
        transposed=True,
    ),
}


def register_spec(model_type: str, spec: ModelSpec) -> None:
    """Register (or replace) the spec used for models whose ``config.model_type`` is
    ``model_type``."""
    if not isinstance(model_type, str) or not model_type.strip():
        msg = f"model_type must be a non-empty string, got {model_type!r}"
        raise ValueError(msg)
    if not isinstance(spec, ModelSpec):
        msg = f"spec must be a ModelSpec, got {type(spec).__name__}"
        raise TypeError(msg)
    _REGISTRY[model_type] = spec


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> ModelSpec:
    """The spec registered for ``model_type``; UnknownArchitectureError saying how to add one."""
    spec = _REGISTRY.get(model_type)
    if spec is None:
        known = ", ".join(sorted(_REGISTRY))
        msg = (
            f"no ModelSpec is registered for model_type {model_type!r} (known: {known}). "
            f"Register one before loading: memedit.spec.register_spec({model_type!r}, "
            "ModelSpec(layers=..., mlp_in=(...,), mlp_out=..., attn_out=..., embed=..., "
            "final_norm=..., lm_head=..., n_layers_attr=..., hidden_size_attr=...)) with the "
            "module paths printed by model.named_modules()"
        )
        raise UnknownArchitectureError(msg)
    return spec


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        msg = f"{type(model).__name__} has no config.model_type; cannot choose a ModelSpec"
        raise UnknownArchitectureError(msg)
    return model_type


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        msg = f"{type(model).__name__} has no .config; memedit needs a transformers model"
        raise TypeError(msg)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _config_int(model: nn.Module, attr: str) -> int:
    value = getattr(_text_config(model), attr, None)
    if not isinstance(value, int):
        msg = f"{type(model).__name__}.config has no integer {attr!r} (got {value!r})"
        raise ModulePathError(msg, path=f"config.{attr}")
    return value


def n_layers(model: nn.Module, spec: ModelSpec | None = None) -> int:
    """Number of transformer blocks, read from the config attribute the spec names."""
    spec = spec or get_spec(_model_type(model))
    return _config_int(model, spec.n_layers_attr)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes a key/value cache by: ``cache`` (transformers 5.x;
    ``past_key_values`` there is deprecated, to be removed in 5.40), else ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass with ``use_cache=True`` returned, under either name."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def hidden_size(model: nn.Module, spec: ModelSpec | None = None) -> int:
    """Width of the residual stream, read from the config attribute the spec names."""
    spec = spec or get_spec(_model_type(model))
    return _config_int(model, spec.hidden_size_attr)


def resolve(model: nn.Module, template: str, layer: int | None = None) -> nn.Module:
    """The module at ``template`` with ``{layer}`` filled in; ModulePathError if none."""
    if "{layer}" in template:
        if layer is None:
            msg = f"module path template {template!r} needs a layer index, got layer=None"
            raise ModulePathError(msg, path=template)
        path = template.format(layer=layer)
    else:
        path = template
    try:
        return model.get_submodule(path)
    except AttributeError:
        msg = f"{type(model).__name__} has no module {path!r} (from template {template!r})"
        raise ModulePathError(msg, path=path) from None


def weight_matrix(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of module ``name`` as an (out_features, in_features) view.

    ``nn.Linear`` already stores (out, in); GPT-2's ``Conv1D`` stores (in, out) and is
    returned transposed. The result is a view: writing into it writes the parameter.
    """
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name) if name else model
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        msg = f"module {name!r} ({type(module).__name__}) has no 2-D weight"
        raise ModulePathError(msg, path=name)
    return weight.t() if isinstance(module, Conv1D) else weight


def ensure_spec(model: nn.Module) -> ModelSpec:
    """The spec for ``model``, after checking every template resolves on it (first and last
    layer) and the layer list has ``n_layers`` blocks."""
    from torch import nn

    spec = get_spec(_model_type(model))
    count = n_layers(model, spec)
    hidden_size(model, spec)
    blocks = resolve(model, spec.layers)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != count:
        msg = (
            f"{spec.layers!r} of {type(model).__name__} should be a ModuleList of {count} "
            f"blocks (config.{spec.n_layers_attr}), got {type(blocks).__name__}"
        )
        raise ModulePathError(msg, path=spec.layers)
    for layer in sorted({0, count - 1}):
        for template in spec.templates().values():
            resolve(model, template, layer)
    return spec
