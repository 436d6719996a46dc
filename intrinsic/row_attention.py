"""Attention of packed rows, one row at a time: what a value pass's attention costs by rows
instead of by the square of everything it packs.

A value pass (:mod:`memedit.intrinsic.values`) lays every row of several requests end to end
in one sequence, after a cache holding each row's first tokens, and a 4-D mask lets each token
see only its own row. Dense attention over that sequence computes (and differentiates) every
pair of tokens and then masks almost all of them away: with four requests (36 rows, about 150
new tokens after 320 cached ones) 97 % of the pairs belong to other rows. Here each row's
queries and the keys it may see are gathered into a small padded batch (row, head, query, key),
attended with the row's own causal mask and scattered back in the packed order, so the
result is the dense mask's to rounding and the cost grows with the rows, not with their
square.

:func:`row_attention` switches a model's attention to this for the passes of one layout
(:func:`row_plan`) and back on exit. Any other call meanwhile (another shape, another thread,
an argument it does not handle) runs the implementation it replaced, with the mask that one
would have built.
Models whose attention transformers dispatches through its ``AttentionInterface`` (Llama,
Mistral, Qwen2, Gemma and most current decoders) can use it; :func:`supports_row_attention`
says whether a model does.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["NAME", "RowPlan", "row_attention", "row_plan", "supports_row_attention"]

#: The name the attention function is registered under in transformers' AttentionInterface.
NAME = "memedit_rows"

_PLAN: contextvars.ContextVar[tuple[RowPlan, str] | None] = contextvars.ContextVar(
    "memedit_row_plan"
)
#: Arguments transformers' attention modules pass that do not change what attention computes
#: here (``softcap`` and ``sliding_window`` are applied); any other one given makes the call
#: run the replaced implementation instead, as does a shape other than the plan's.
_NEUTRAL = frozenset(
    {"position_ids", "use_cache", "cache_position", "output_attentions", "cache", "past_key_values"}
)
_REGISTERED: list[bool] = []


@dataclass(frozen=True)
class RowPlan:
    """Where each row's queries and visible keys are in a pass's packed sequence.

    ``q_idx`` (rows, q_max): the row's query positions among the pass's new tokens (padding
    repeats a valid one); ``q_valid``: which of them are real; ``k_idx`` (rows, k_max): the
    key positions it may see, its cached tokens first (indices into cache + new tokens);
    ``mask`` (rows, 1, q_max, k_max): True where a query sees a key (its cached tokens, and
    its own new tokens up to itself); ``q_rows``: where the real queries are among the
    flattened (rows * q_max) ones, in the packed order; ``q_pos``: each query's position in
    its row (key ``j`` of a row is at position ``j``)."""

    q_idx: torch.Tensor
    q_valid: torch.Tensor
    k_idx: torch.Tensor
    mask: torch.Tensor
    q_rows: torch.Tensor
    q_pos: torch.Tensor
    n_queries: int
    n_keys: int


def row_plan(
    lengths: Sequence[int],
    row_ids: Sequence[int],
    cached_rows: torch.Tensor | None,
    device: torch.device,
) -> RowPlan:
    """The plan for new tokens laid out as rows of ``lengths`` (in order), row ``i`` being
    ``row_ids[i]``, after a cache whose token ``j`` belongs to row ``cached_rows[j]`` (each
    row's cached tokens contiguous; None: no cache)."""
    import torch

    n_rows = len(lengths)
    length = torch.tensor(list(lengths), dtype=torch.long, device=device)
    start = torch.cumsum(length, 0) - length
    n_cached = 0 if cached_rows is None else len(cached_rows)
    if cached_rows is not None and n_cached:
        ids = torch.tensor(list(row_ids), dtype=torch.long, device=device)
        owns = cached_rows[None, :] == ids[:, None]  # (rows, cached)
        c_len = owns.sum(dim=1)
        c_start = torch.where(c_len > 0, owns.float().argmax(dim=1), torch.zeros_like(c_len))
    else:
        c_len = torch.zeros(n_rows, dtype=torch.long, device=device)
        c_start = torch.zeros_like(c_len)
    q_max = int(length.max()) if n_rows else 0
    k_max = int((c_len + length).max()) if n_rows else 0
    qi = torch.arange(q_max, device=device)[None, :]
    q_valid = qi < length[:, None]
    q_idx = torch.where(q_valid, start[:, None] + qi, start[:, None])
    kj = torch.arange(k_max, device=device)[None, :]
    is_cached = kj < c_len[:, None]
    is_new = ~is_cached & (kj < (c_len + length)[:, None])
    k_idx = torch.where(
        is_cached,
        c_start[:, None] + kj,
        torch.where(is_new, n_cached + start[:, None] + kj - c_len[:, None], 0),
    )
    # query i of a row (its i-th new token) sees the row's cached tokens and new tokens 0..i
    sees = is_cached[:, None, :] | (
        is_new[:, None, :] & ((kj - c_len[:, None])[:, None, :] <= qi[:, :, None])
    )
    # a padding query sees the first key only (its output is dropped; no row of all -inf)
    sees = (sees & q_valid[:, :, None]) | (~q_valid[:, :, None] & (kj == 0)[:, None, :])
    n_new = int(length.sum())
    q_rows = q_valid.flatten().nonzero().flatten()  # the real queries, in packed order
    q_pos = c_len[:, None] + qi
    return RowPlan(q_idx, q_valid, k_idx, sees[:, None], q_rows, q_pos, n_new, n_cached + n_new)


def supports_row_attention(model: nn.Module) -> bool:
    """Whether ``model``'s attention is looked up by name in transformers' AttentionInterface
    (so :func:`row_attention` reaches it)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        from transformers import AttentionInterface  # noqa: F401
    except ImportError:  # pragma: no cover - transformers before the interface
        return False
    return all(
        getattr(m, "config", config) is config
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
    )


@contextmanager
def row_attention(model: nn.Module, plan: RowPlan) -> Iterator[None]:
    """Within the block, ``model``'s attention runs row by row per ``plan`` for calls of the
    plan's shape; its attention setting is restored on exit, also on an exception."""
    _register()
    config: Any = model.config
    before = config._attn_implementation
    token = _PLAN.set((plan, before))
    config._memedit_replaced_attention = before  # for calls from other threads (no plan)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        del config._memedit_replaced_attention
        _PLAN.reset(token)


def _register() -> None:
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    _REGISTERED.append(True)


def _mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The mask a model builds itself under :data:`NAME` (a call given no 4-D mask): the one
    of the implementation replaced, so such a call runs as it would have."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = getattr(config, "_memedit_replaced_attention", "sdpa")
    build = AttentionMaskInterface().get(name, sdpa_mask)
    return build(*args, config=config, **kwargs)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` (batch, heads, q, dim), ``key``/``value``
    (batch, kv heads, k, dim); returns (batch, q, heads, dim)."""
    import torch

    found = _PLAN.get(None)
    softcap = kwargs.pop("softcap", None)
    window = kwargs.pop("sliding_window", None)
    other = sorted(k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL)
    if (
        found is None
        or other
        or dropout
        or query.shape[0] != 1
        or query.shape[2] != found[0].n_queries
        or key.shape[2] != found[0].n_keys
    ):
        if softcap is not None:
            kwargs["softcap"] = softcap
        if window is not None:
            kwargs["sliding_window"] = window
        name = found[1] if found is not None else _replaced_name(module)
        replaced = _replaced(module, name)
        result: tuple[torch.Tensor, None] = replaced(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return result
    plan = found[0]
    groups = query.shape[1] // key.shape[1]
    rows, q_max = plan.q_idx.shape
    k_max = plan.k_idx.shape[1]
    # index_select, whose gradient is an index_add (advanced indexing's, an accumulating
    # index_put, is several times slower on a CPU)
    q = query[0].index_select(1, plan.q_idx.flatten()).unflatten(1, (rows, q_max))
    k = key[0].index_select(1, plan.k_idx.flatten()).unflatten(1, (rows, k_max))
    v = value[0].index_select(1, plan.k_idx.flatten()).unflatten(1, (rows, k_max))
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (rows, heads, ., dim)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # written out rather than scaled_dot_product_attention: on a CPU its fused kernel's
    # backward costs milliseconds per call however small the rows, more than the whole layer.
    # In float32 whatever the model's dtype, as the fused kernels accumulate (the rows are few)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:  # Gemma 2: logits squashed into (-softcap, softcap)
        scores = torch.tanh(scores / softcap) * softcap
    mask = plan.mask
    if window is not None and plan.k_idx.shape[1] > window:  # keys too far back drop out
        k_pos = torch.arange(plan.k_idx.shape[1], device=mask.device)
        near = (plan.q_pos[:, :, None] - k_pos[None, None, :]) < window
        mask = mask & near[:, None]
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.matmul(weights, v.float()).to(query.dtype)
    out = out.transpose(1, 2).flatten(0, 1)  # (rows * q_max, heads, dim)
    return out.index_select(0, plan.q_rows)[None], None  # (1, q, heads, dim)


def _replaced(module: nn.Module, name: str) -> Any:
    """The attention function ``name`` stands for: transformers' sdpa, the model's own eager
    function (defined beside its attention module), or one registered under ``name``."""
    import sys

    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if name == "eager":
        found = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if found is None:
            msg = f"no eager attention function beside {type(module).__name__}"
            raise RuntimeError(msg)
        return found
    from transformers import AttentionInterface

    return AttentionInterface()[name]


def _replaced_name(module: nn.Module) -> str:
    """The implementation a plan-less call stands for: the one :func:`row_attention` replaced
    on the module's config (a call from another thread while a pass runs), else sdpa."""
    config = getattr(module, "config", None)
    return str(getattr(config, "_memedit_replaced_attention", "sdpa"))
