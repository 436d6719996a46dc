"""Target values: what the edited module should output at the subject for the new fact.

:func:`optimise_value` is ROME's ``compute_v`` (and MEMIT's ``compute_z`` with the block output
as the module): a vector added to a module's output at the subject's last token is optimised
so that the model predicts the new target after every context prefix, while the distribution
after ``"{subject} is a"`` stays close to the unedited one. :func:`context_prefixes` makes
those prefixes by sampling the model itself (no data needed).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError

from .compute import (
    encode,
    forward_logits,
    frozen,
    lookup_index,
    model_device,
    pad_id,
    subject_token_index,
    target_batch,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

    from .hparams import ValueHparams

__all__ = ["STARTERS", "ValueResult", "context_prefixes", "optimise_value"]

logger = logging.getLogger(__name__)

#: Sampled prefixes start with one of these words (EasyEdit's ``get_context_templates``).
STARTERS = ("The", "Therefore", "Because", "I", "You")

_PREFIXES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, int, int], tuple[str, ...]]]
_PREFIXES = weakref.WeakKeyDictionary()


def context_prefixes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int, length: int, seed: int
) -> tuple[str, ...]:
    """``""`` and ``n`` short texts sampled from the model (top-5, ``length`` new tokens after a
    starter word, fixed ``seed``), each ending in ``". "``. Cached per model, so a model edited
    sequentially keeps the prefixes it had first."""
    import torch

    key = (id(tokenizer), n, length, seed)
    cached = _PREFIXES.setdefault(model, {}).get(key)
    if cached is not None:
        return cached
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [""]
    counts = [sum(1 for i in range(n) if i % len(STARTERS) == s) for s in range(len(STARTERS))]
    with torch.no_grad():
        for starter, count in zip(STARTERS, counts, strict=True):
            if not count:
                continue
            ids = torch.tensor([encode(tokenizer, starter)] * count, device=device)
            for _ in range(length):
                keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
                keep[:, -1] = True
                logits = forward_logits(model, ids, torch.ones_like(ids), keep).float()
                top = logits.topk(min(5, logits.shape[-1]), dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
            for row in ids.tolist():
                text = str(tokenizer.decode(row, skip_special_tokens=True))
                out.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". ")
    result = tuple(out)
    _PREFIXES[model][key] = result
    logger.debug("context prefixes: %s", result)
    return result


@dataclass(frozen=True)
class _Rows:
    """One forward pass's rows: ``ids`` (what follows the cached tokens, if any), the attention
    ``mask`` over cached and new tokens, the positions whose logits are kept, and where the
    edited output is changed (row ``index[i]``, column ``cols[i]`` of ``ids``)."""

    ids: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor
    cols: torch.Tensor
    positions: torch.Tensor | None = None
    past: Any = None


def _rows(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    cols: Sequence[int],
    cache: bool,
    pad: int,
) -> _Rows:
    """Rows for :func:`optimise_value`. With ``cache``, each row's tokens before its edited
    position ``cols[i]`` (which the edit cannot affect) are run once now and kept as keys and
    values; each step then runs only the rest of every row, at its true positions.

    The cached part is right-padded to the longest; it is run with every slot attended (pad
    slots only see their own row's real tokens before them, causally, so they change nothing
    and stay finite), and later passes mask the pad slots out."""
    import torch

    index = torch.arange(ids.shape[0], device=ids.device)
    width = max(cols)
    if not cache or width == 0:
        return _Rows(ids, mask, keep, index, torch.tensor(list(cols), device=ids.device))
    lengths = mask.sum(dim=1).tolist()
    rest = max(n - c for n, c in zip(lengths, cols, strict=True))
    head = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
    head_mask = torch.zeros_like(head)
    tail = torch.full((ids.shape[0], rest), pad, dtype=ids.dtype, device=ids.device)
    tail_mask = torch.zeros_like(tail)
    tail_keep = torch.zeros(tail.shape, dtype=torch.bool, device=ids.device)
    positions = torch.zeros_like(tail)
    for i, (n, c) in enumerate(zip(lengths, cols, strict=True)):
        if bool(keep[i, :c].any()):
            msg = f"row {i} needs logits before its edited position {c}"
            raise ValueError(msg)
        head[i, :c], head_mask[i, :c] = ids[i, :c], 1
        tail[i, : n - c], tail_mask[i, : n - c] = ids[i, c:n], 1
        tail_keep[i, : n - c] = keep[i, c:n]
        positions[i] = torch.arange(c, c + rest, device=ids.device)
    with torch.no_grad():
        out = model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True)
    return _Rows(
        ids=tail,
        mask=torch.cat([head_mask, tail_mask], dim=1),
        keep=tail_keep,
        index=index,
        cols=torch.zeros(len(cols), dtype=torch.long, device=ids.device),
        positions=positions,
        past=out.past_key_values,
    )


@dataclass(frozen=True)
class ValueResult:
    """The module's output at the bare prompt's lookup token before the edit (``init``), the
    optimised output (``target = init + delta``), the final loss and the passes it took."""

    init: torch.Tensor
    target: torch.Tensor
    loss: float
    nll: float
    steps: int


def optimise_value(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    module_name: str,
    prefixes: Sequence[str],
    hp: ValueHparams,
) -> ValueResult:
    """Optimise the output of ``module_name`` at the request's subject so the model says
    ``request.target_new`` after ``prefix + request.prompt`` for every prefix (see
    :class:`~memedit.intrinsic.hparams.ValueHparams` for the loss). ``prefixes[0]`` must be
    ``""``: the bare prompt's output is the starting point ``init``."""
    import torch

    from memedit.hooks import edit_output

    if not prefixes or prefixes[0] != "":
        msg = f"prefixes must start with '' (the bare prompt), got {list(prefixes)[:2]!r}"
        raise InvalidRequestError(msg, field="prefixes", value=prefixes)
    device = model_device(model)
    cols = [lookup_index(tokenizer, p, request) for p in prefixes]
    # Rows whose next-token distributions must not move: ROME's "essence" ("{subject} is a",
    # read after the subject) and the neighbour prompts (read after their last token).
    keep_rows: list[list[int]] = []
    read_at: list[int] = []
    weights: list[float] = []
    if request.subject:
        texts = [("{} is a", hp.kl_factor, True)] + [
            (t, hp.neighbour_factor, False) for t in hp.neighbour_templates
        ]
        for template, factor, at_subject in texts:
            if factor <= 0:
                continue
            text = template.format(request.subject)
            ids = encode(tokenizer, text)
            start = template.index("{}")
            col = subject_token_index(tokenizer, text, start, start + len(request.subject))
            keep_rows.append(ids)
            cols.append(col)
            read_at.append(col if at_subject else len(ids) - 1)
            weights.append(factor)
    batch = target_batch(
        tokenizer,
        [(p + request.prompt, request.target_new) for p in prefixes],
        device,
        extra_rows=keep_rows,
        extra_keep=read_at,
    )
    rows = _rows(model, batch.ids, batch.mask, batch.keep, cols, hp.prefix_cache, pad_id(tokenizer))
    kl_at = [int(batch.flat[len(prefixes) + j, pos]) for j, pos in enumerate(read_at)]
    kl_weight = torch.tensor(weights, device=device)

    state: dict[str, Any] = {"delta": None, "init": None}

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        if state["delta"] is None:
            state["delta"] = torch.zeros(
                out.shape[-1], device=out.device, dtype=torch.float32, requires_grad=True
            )
            state["init"] = out[0, rows.cols[0]].detach().float().clone()
        add = state["delta"].to(out.dtype).expand(len(rows.cols), -1)
        return out.index_put((rows.index, rows.cols), add, accumulate=True)

    opt: torch.optim.Optimizer | None = None
    kl_init: torch.Tensor | None = None
    loss_v, nll_v, steps = float("nan"), float("nan"), 0
    with frozen(model), edit_output(model, module_name, add_delta):
        for step in range(hp.v_steps):
            steps = step + 1
            past = copy.deepcopy(rows.past)  # each pass extends the cache it is given
            logits = forward_logits(
                model,
                rows.ids,
                rows.mask,
                rows.keep,
                past_key_values=past,
                position_ids=rows.positions,
            )
            logp = logits.float().log_softmax(dim=-1)
            nll = batch.nll(logp).mean()
            delta, init = state["delta"], state["init"]
            loss = nll + hp.v_weight_decay * delta.norm() / init.norm().clamp_min(1e-12) ** 2
            if kl_at:
                cur = logp[kl_at]
                if kl_init is None:
                    kl_init = cur.detach().clone()
                kl = (cur.exp() * (cur - kl_init)).sum(dim=-1)
                loss = loss + (kl_weight * kl).sum()
            loss_v, nll_v = float(loss.detach()), float(nll.detach())
            logger.debug("value step %d: loss %.4f nll %.4f", step, loss_v, nll_v)
            if nll_v < hp.early_stop_loss or step == hp.v_steps - 1:
                break
            if opt is None:
                opt = torch.optim.Adam([delta], lr=hp.v_lr)
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * init.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    init, delta = state["init"], state["delta"]
    return ValueResult(
        init=init, target=(init + delta.detach()), loss=loss_v, nll=nll_v, steps=steps
    )
