"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a batch of facts written
into the MLP output projections of a run of layers at once.

1. For every request a target ``z`` for the residual stream after the *last* edited layer, at
   the subject's last token of the bare prompt, is optimised so the model says the new target
   (:func:`~memedit.intrinsic.values.optimise_values` on that block's output, the requests
   batched in one pass; the same vector added at the block output or at its MLP output is the
   same change of the residual stream).
2. For each edited layer ``l``, lowest first, on the model the previous layers' updates left:
   keys ``K`` (rows: each request's key at layer ``l``, averaged over context prefixes), the
   residual ``R = (z − h_L) / (layers left, this one included)`` with ``h_L`` the current
   last-layer output, and the update ``Δ_l = Rᵀ K (λ C_l + KᵀK)⁻¹`` with ``C_l = E[k kᵀ]``
   (:class:`~memedit.intrinsic.stats.KeyStatistics`) and ``λ = mom2_update_weight``, solved in
   float64 (:func:`~memedit.intrinsic.compute.least_squares_update`) and added to the weight.

Step 2 is :func:`spread_update`, parameterised by the per-layer solve: AlphaEdit
(``alphaedit.py``) is the same loop with another solve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from memedit.errors import InvalidRequestError

from .api import EditContext, register_method
from .compute import (
    block_name,
    least_squares_update,
    lookup_outputs,
    mlp_out_name,
    model_device,
    subject_keys,
)
from .hparams import NEIGHBOUR_TEMPLATES, ValueHparams, check_float, check_int
from .values import context_prefixes, optimise_values

if TYPE_CHECKING:
    import torch


__all__ = ["LayerSolve", "MemitHparams", "SpreadHparams", "edit_memit", "spread_update"]

logger = logging.getLogger(__name__)

#: ``(layer, keys (n, in), residuals (n, out)) -> update (out, in)``, float64.
LayerSolve = Callable[[int, "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class SpreadHparams(ValueHparams):
    """What MEMIT-style methods share: ``layers`` (strictly increasing; default: measured per
    model, else about 10-30 % of the depth), the value optimisation at the last of them
    (:class:`~memedit.intrinsic.hparams.ValueHparams`) and ``stats_tokens`` tokens of text for
    each layer's key statistics.

    The value keeps ROME's three neighbour prompts about the subject (factor 0.5, 30 steps).
    On one batch of the first 20 ZsRE dev records (``benchmarks/memit_edit.py --limit 20
    --neighbours 0.5 --hp v_steps=30`` against the paper's loss with 20 steps) Edit Succ. /
    rephrase / Locality went from 96.9 / 68.4 / 50.7 to 92.6 / 63.2 / 62.9 for MEMIT and from
    96.8 / 74.0 / 52.1 to 96.1 / 61.4 / 64.0 for AlphaEdit: the subject's other relations
    move less, at a cost in rephrasings; ``neighbour_factor=0`` gives the paper's loss."""

    layer_role: ClassVar[str] = "memit"

    v_steps: int = 30
    neighbour_templates: tuple[str, ...] = NEIGHBOUR_TEMPLATES
    neighbour_factor: float = 0.5

    stats_tokens: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.layers is not None and list(self.layers) != sorted(set(self.layers)):
            msg = f"{owner}.layers must be strictly increasing, got {self.layers!r}"
            raise InvalidRequestError(msg, field="layers", value=self.layers)
        check_int(owner, "stats_tokens", self.stats_tokens, minimum=1)


@dataclass(frozen=True)
class MemitHparams(SpreadHparams):
    """MEMIT. ``mom2_update_weight`` (λ): weight of the key statistics ``E[k kᵀ]`` against the
    new keys in each layer's least squares — larger keeps the layer closer to its old outputs
    on ordinary text and realises less of each residual. EasyEdit uses 15000 for Llama-2-7B
    (11008 keys). On SmolLM2-135M (1536 keys; 20 ZsRE edits in one batch, layers 3-7,
    ``benchmarks/memit_edit.py``) 15000 / 5000 / 1500 give Edit Succ. 75 / 97 / 98, rephrase
    46 / 68 / 74, Locality 58 / 51 / 48: 5000 is the default."""

    mom2_update_weight: float = 5000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(type(self).__name__, "mom2_update_weight", self.mom2_update_weight)


def spread_update(ctx: EditContext, solve: LayerSolve) -> dict[int, torch.Tensor]:
    """MEMIT's loop: optimise each request's target at the last layer, then write one update
    per layer, lowest first, from ``solve(layer, keys, residuals)``; returns the keys each
    layer was solved with, (n, in) float32. Diagnostics go to ``ctx.delta.info``:
    ``value_loss``/``value_nll``/``value_steps`` per request, and ``residual_norm`` — the mean
    ``‖z − h_L‖`` before each layer's update and once more after the last one."""
    import torch

    hp: SpreadHparams = ctx.hparams
    model, tok, requests = ctx.model, ctx.tokenizer, list(ctx.requests)
    assert hp.layers is not None
    top = block_name(model, hp.layers[-1])
    prefixes = context_prefixes(model, tok, hp.n_prefixes, hp.prefix_tokens, hp.prefix_seed)
    values = optimise_values(model, tok, requests, top, prefixes, hp)
    for name in ("loss", "nll", "steps"):
        ctx.delta.info[f"value_{name}"] = [getattr(v, name) for v in values]
    device = model_device(model)
    z = torch.stack([v.target.to(device) for v in values])
    norms: list[float] = []
    used: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(hp.layers):
        keys = subject_keys(model, tok, layer, requests, prefixes).mean
        gap = z - lookup_outputs(model, tok, top, requests)
        norms.append(float(gap.norm(dim=1).mean()))
        update = solve(layer, keys, gap / (len(hp.layers) - i))
        ctx.delta.add_to_matrix(mlp_out_name(model, layer), update)
        used[layer] = keys
        logger.debug("layer %d: residual %.4f, update norm %.4f", layer, norms[-1], update.norm())
    gap = z - lookup_outputs(model, tok, top, requests)
    norms.append(float(gap.norm(dim=1).mean()))
    ctx.delta.info["residual_norm"] = norms
    return used


def edit_memit(ctx: EditContext) -> None:
    """Apply ``ctx.requests`` as one MEMIT batch, recording into ``ctx.delta``."""
    hp: MemitHparams = ctx.hparams
    assert hp.layers is not None
    # every layer's statistics before the first write: an update of a lower layer changes the
    # keys (and the cache key) of the layers above
    covs = {
        layer: ctx.stats.second_moment(ctx.model, ctx.tokenizer, layer, hp.stats_tokens)
        for layer in hp.layers
    }

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        return least_squares_update(keys, residuals, hp.mom2_update_weight * covs[layer])

    spread_update(ctx, solve)


register_method("memit", MemitHparams, edit_memit)
