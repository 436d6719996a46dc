"""Low-rank deltas applied with forward hooks, never written into the base weights.

For a linear module ``y = W x`` the adapter adds ``scale * B (A x)`` to the module's output
while :meth:`LowRankAdapter.active` is open (A: rank × in, B: out × rank, B starts at zero).
The hooks are removed in ``finally``, so the model is bit-for-bit as before on exit, also
when the body raises. Weights are saved as float16 safetensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.errors import ModulePathError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

__all__ = ["LoraConfig", "LowRankAdapter", "target_modules"]


@dataclass(frozen=True)
class LoraConfig:
    """Which linear modules get a delta and how large it is.

    ``layers`` None means every layer; ``module_template`` is a path with ``{layer}`` and
    ``{proj}`` placeholders (llama-style models: ``model.layers.{layer}.self_attn.{proj}``).
    """

    rank: int = 8
    alpha: float = 16.0
    projections: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    layers: tuple[int, ...] | None = None
    module_template: str = "model.layers.{layer}.self_attn.{proj}"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            msg = f"LoraConfig.rank must be a positive integer, got {self.rank!r}"
            raise ValueError(msg)
        object.__setattr__(self, "projections", tuple(self.projections))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["projections"] = list(self.projections)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        layers = data.get("layers")
        return cls(
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            projections=tuple(data["projections"]),
            layers=tuple(layers) if layers is not None else None,
            module_template=str(data["module_template"]),
        )


def target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """The module paths the config addresses on ``model`` (checked to be linear layers)."""
    from torch import nn

    n_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    names = [
        config.module_template.format(layer=layer, proj=proj)
        for layer in layers
        for proj in config.projections
    ]
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            msg = f"{type(model).__name__} has no module {name!r}"
            raise ModulePathError(msg, path=name) from None
        if not isinstance(module, nn.Linear):
            msg = f"{name!r} is a {type(module).__name__}, not a Linear layer"
            raise ModulePathError(msg, path=name)
    return names


class LowRankAdapter:
    """Trainable or frozen low-rank deltas for a set of linear modules, applied by hooks."""

    def __init__(
        self,
        config: LoraConfig,
        shapes: dict[str, tuple[int, int]],
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        self.config = config
        self.names = tuple(shapes)
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        gen = torch.Generator().manual_seed(seed)
        for name, (out_f, in_f) in shapes.items():
            if tensors is not None:
                a = tensors[f"{name}.lora_A"].float().clone()
                b = tensors[f"{name}.lora_B"].float().clone()
                if a.shape != (config.rank, in_f) or b.shape != (out_f, config.rank):
                    msg = (
                        f"adapter tensors for {name!r} have shapes {tuple(a.shape)}, "
                        f"{tuple(b.shape)}; the model needs ({config.rank}, {in_f}), "
                        f"({out_f}, {config.rank})"
                    )
                    raise ValueError(msg)
            else:
                a = torch.randn(config.rank, in_f, generator=gen) / in_f**0.5
                b = torch.zeros(out_f, config.rank)
            self.params[name] = (a, b)
        self._cast: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, config: LoraConfig, *, seed: int = 0) -> LowRankAdapter:
        """A fresh adapter (B = 0: no effect until trained) for ``model``'s target modules."""
        shapes = {}
        for name in target_modules(model, config):
            weight = model.get_submodule(name).get_parameter("weight")
            shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
        return cls(config, shapes, seed=seed)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.params.values() for t in pair]

    def train_mode(self) -> list[torch.Tensor]:
        """Make the float32 tensors trainable (leaves with ``requires_grad``) and return them."""
        for a, b in self.params.values():
            a.requires_grad_(True)
            b.requires_grad_(True)
        self._cast.clear()
        return self.parameters()

    def freeze(self) -> None:
        for a, b in self.params.values():
            a.requires_grad_(False)
            b.requires_grad_(False)
        self._cast.clear()

    def _weights(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.params[name]
        if a.requires_grad:  # training: use the leaves themselves (moved if needed)
            return a.to(like.device, like.dtype), b.to(like.device, like.dtype)
        key = (name, str(like.device), str(like.dtype))
        cached = self._cast.get(key)
        if cached is None:
            cached = (a.to(like.device, like.dtype), b.to(like.device, like.dtype))
            self._cast[key] = cached
        return cached

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Add the deltas to the target modules' outputs while the block runs."""
        scale = self.config.scale
        handles: list[RemovableHandle] = []
        try:
            for name in self.names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    msg = f"{type(model).__name__} has no module {name!r}"
                    raise ModulePathError(msg, path=name) from None

                def hook(
                    _m: nn.Module, args: tuple[Any, ...], output: Any, name: str = name
                ) -> Any:
                    x = args[0]
                    a, b = self._weights(name, x)
                    return output + scale * ((x @ a.T) @ b.T)

                handles.append(module.register_forward_hook(hook))
            yield
        finally:
            while handles:
                handles.pop().remove()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a, b) in self.params.items():
            out[f"{name}.lora_A"] = a.detach().half().contiguous()
            out[f"{name}.lora_B"] = b.detach().half().contiguous()
        return out

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(dest), metadata=metadata)
        return dest

    @classmethod
    def load(
        cls, path: str | Path, config: LoraConfig, names: Sequence[str] | None = None
    ) -> LowRankAdapter:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        found = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        wanted = list(names) if names is not None else found
        shapes = {}
        for name in wanted:
            a = tensors[f"{name}.lora_A"]
            b = tensors[f"{name}.lora_B"]
            shapes[name] = (int(b.shape[0]), int(a.shape[1]))
        return cls(config, shapes, tensors=tensors)
