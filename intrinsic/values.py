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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError
from memedit.spec import returned_cache

from .compute import (
    encode,
    forward_logits,
    frozen,
    lookup_index,
    lookup_outputs,
    model_device,
    pad_id,
    subject_token_index,
    target_batch,
)
from .layer_cache import BelowCache
from .row_attention import row_attention, row_plan, supports_row_attention

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

    from .compute import TargetBatch
    from .hparams import ValueHparams
    from .row_attention import RowPlan

__all__ = ["STARTERS", "ValueResult", "context_prefixes", "optimise_value", "optimise_values"]

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
    plan: RowPlan | None = None


@dataclass(frozen=True)
class _Head:
    """Keys and values of every row's tokens before its edited position, laid end to end in
    one sequence (``past``), and the row each of those tokens belongs to (``rows``, by the
    row ids :func:`_packed_rows` is given)."""

    past: Any
    rows: torch.Tensor


def _rows(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    cols: Sequence[int],
    cache: bool,
    pad: int,
) -> _Rows:
    """Rows for :func:`optimise_value` when the model's attention cannot take a custom mask
    (else :func:`_packed_rows`). With ``cache``, each row's tokens before its edited position
    ``cols[i]`` (which the edit cannot affect) are run once now and kept as keys and values,
    right-padded to the longest; each step then runs only the rest of every row, at its true
    positions.

    The cached part is run with every slot attended (pad slots only see their own row's real
    tokens before them, causally, so they change nothing and stay finite), and later passes
    mask the pad slots out."""
    import torch

    _check_cols(keep, cols)
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
        head[i, :c], head_mask[i, :c] = ids[i, :c], 1
        tail[i, : n - c], tail_mask[i, : n - c] = ids[i, c:n], 1
        tail_keep[i, : n - c] = keep[i, c:n]
        positions[i] = torch.arange(c, c + rest, device=ids.device)
    with torch.no_grad():
        out = model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True)
    past = returned_cache(out)
    return _Rows(
        ids=tail,
        mask=torch.cat([head_mask, tail_mask], dim=1),
        keep=tail_keep,
        index=index,
        cols=torch.zeros(len(cols), dtype=torch.long, device=ids.device),
        positions=positions,
        past=past,
    )


def _check_cols(keep: torch.Tensor, cols: Sequence[int]) -> None:
    for i, c in enumerate(cols):
        if bool(keep[i, :c].any()):
            msg = f"row {i} needs logits before its edited position {c}"
            raise ValueError(msg)


#: Attention implementations that apply a caller's 4-D additive mask as given.
_CUSTOM_MASK_ATTENTION = frozenset({"sdpa", "eager"})


def _takes_custom_mask(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in _CUSTOM_MASK_ATTENTION


def _packed_rows(
    model: nn.Module,
    ids: torch.Tensor,
    keep: torch.Tensor,
    cols: Sequence[int],
    row_ids: Sequence[int],
    head: _Head | None,
) -> tuple[_Rows, _Head]:
    """The cached layout without padding. Every row's tokens from ``cols[i]`` to its last
    kept position (what follows cannot change a kept logit) are laid end to end in the one
    sequence each step runs; its tokens before ``cols[i]`` are read from ``head``, which is
    made here (one pass, no gradient) when not given — a later, smaller set of rows (requests
    that stopped leave the pass) reuses the first one's. A 4-D mask lets each token see only
    its own row's earlier tokens (rows matched by ``row_ids``) and position ids restart with
    each row, so every token is computed as in its own row; the kept logits come out in the
    padded layout's order."""
    import torch

    _check_cols(keep, cols)
    device = ids.device
    dtype = next(model.parameters()).dtype
    ends = [int(keep[i].nonzero().max()) + 1 for i in range(len(cols))]
    if head is None:
        h_row = torch.tensor(
            [r for r, c in zip(row_ids, cols, strict=True) for _ in range(c)],
            dtype=torch.long,
            device=device,
        )
        past = None
        if len(h_row):
            h_idx = torch.arange(len(h_row), device=device)
            sees = (h_row[:, None] == h_row[None, :]) & (h_idx[None, :] <= h_idx[:, None])
            positions = [p for c in cols for p in range(c)]
            with torch.no_grad():
                out = model(
                    input_ids=torch.cat([ids[i, :c] for i, c in enumerate(cols)])[None],
                    attention_mask=_additive(sees, dtype),
                    position_ids=torch.tensor([positions], device=device),
                    use_cache=True,
                )
            past = returned_cache(out)
        head = _Head(past=past, rows=h_row)
    lengths = [e - c for c, e in zip(cols, ends, strict=True)]
    t_row = torch.tensor(
        [r for r, n in zip(row_ids, lengths, strict=True) for _ in range(n)],
        dtype=torch.long,
        device=device,
    )
    t_idx = torch.arange(len(t_row), device=device)
    sees = (t_row[:, None] == t_row[None, :]) & (t_idx[None, :] <= t_idx[:, None])
    if head.past is not None:
        sees = torch.cat([t_row[:, None] == head.rows[None, :], sees], dim=1)
    spans = list(zip(cols, ends, strict=True))
    starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0)
    rows = _Rows(
        ids=torch.cat([ids[i, c:e] for i, (c, e) in enumerate(spans)])[None],
        mask=_additive(sees, dtype),
        keep=torch.cat([keep[i, c:e] for i, (c, e) in enumerate(spans)])[None],
        index=torch.zeros(len(cols), dtype=torch.long, device=device),
        cols=starts,
        positions=torch.tensor([[p for c, e in spans for p in range(c, e)]], device=device),
        past=head.past,
        plan=row_plan(lengths, row_ids, head.rows if head.past is not None else None, device)
        if supports_row_attention(model)
        else None,
    )
    return rows, head


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q, k) boolean "may attend" as the (1, 1, q, k) additive mask attention layers take."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


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
    return optimise_values(model, tokenizer, [request], module_name, prefixes, hp)[0]


#: Requests whose values :func:`optimise_values` optimises in one forward pass on an accelerator.
VALUE_CHUNK = 32

#: The same on a CPU. While the packed layout's attention was dense over every row of the
#: pass, 4 was best (2-core machine, SmolLM2-135M, MEMIT's layer 7: 3.88 s per request against
#: 5.56 s one at a time). Row by row (``row_attention``) the attention no longer grows with the
#: square of the pass, and 8 is (first 16 ZsRE dev requests, ``benchmarks/value_passes.py``,
#: two threads: fp32 3.10 s per request against 3.31-3.49 at 4 and 3.07 at 16; bf16 2.14
#: against 2.40 and 2.31; a MEMIT batch of 100: 327.6 s against 386.5 s at 4).
CPU_VALUE_CHUNK = 8


def optimise_values(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module_name: str,
    prefixes: Sequence[str],
    hp: ValueHparams,
    *,
    chunk: int | None = None,
) -> list[ValueResult]:
    """:func:`optimise_value` for many requests at once, ``chunk`` of them per forward pass
    (default: :data:`VALUE_CHUNK` on an accelerator, :data:`CPU_VALUE_CHUNK` on a CPU).

    Each request has its own vector, its own Adam state, early stop and norm clamp; the loss
    of a pass is the sum of the requests' losses and no request's rows see another's vector,
    so every request's value is the one :func:`optimise_value` finds for it alone (up to
    floating-point summation order). A request that has stopped leaves the pass."""
    if not prefixes or prefixes[0] != "":
        msg = f"prefixes must start with '' (the bare prompt), got {list(prefixes)[:2]!r}"
        raise InvalidRequestError(msg, field="prefixes", value=prefixes)
    if chunk is None:
        chunk = CPU_VALUE_CHUNK if model_device(model).type == "cpu" else VALUE_CHUNK
    if not isinstance(chunk, int) or chunk < 1:
        msg = f"chunk must be a positive integer, got {chunk!r}"
        raise InvalidRequestError(msg, field="chunk", value=chunk)
    from .value_cache import active_value_cache

    cache = active_value_cache()
    found: dict[int, ValueResult] = {}
    keys: list[str] = []
    if cache is not None:  # see value_cache.py for what a key stands for
        keys = [cache.key(model, tokenizer, r, module_name, prefixes, hp) for r in requests]
        for i, key in enumerate(keys):
            hit = cache.get(key, model_device(model))
            if hit is not None:
                found[i] = hit
    todo = [i for i in range(len(requests)) if i not in found]
    runner = _runner(model, hp.value_dtype) if todo else model
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        done = _optimise_chunk(
            runner, tokenizer, [requests[i] for i in part], module_name, prefixes, hp, part[0]
        )
        if runner is not model:
            done = _rebase(model, tokenizer, [requests[i] for i in part], module_name, done)
        for i, value in zip(part, done, strict=True):
            found[i] = value
            if cache is not None:
                cache.put(keys[i], value)
    return [found[i] for i in range(len(requests))]


def _runner(model: nn.Module, value_dtype: str) -> nn.Module:
    """The model the passes run on: ``model`` itself, or a copy of it in ``value_dtype``."""
    import torch

    if value_dtype == "model":
        return model
    dtype = getattr(torch, value_dtype)
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _rebase(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module_name: str,
    values: Sequence[ValueResult],
) -> list[ValueResult]:
    """``values`` optimised on a cast copy, moved onto ``model``'s own starting outputs: the
    change the copy found, added to the output the model itself gives."""
    exact = lookup_outputs(model, tokenizer, module_name, requests)
    return [
        ValueResult(e, e + (v.target - v.init).to(e.dtype), v.loss, v.nll, v.steps)
        for e, v in zip(exact, values, strict=True)
    ]


@dataclass(frozen=True)
class _Plan:
    """One request's rows: the prefixed prompts with the target, then the KL rows (text,
    where the edited output changes, where the distribution is read, weight)."""

    pairs: list[tuple[str, str]]
    cols: list[int]
    kl_rows: list[list[int]]
    kl_cols: list[int]
    kl_read: list[int]
    kl_weights: list[float]


def _plan(
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    prefixes: Sequence[str],
    hp: ValueHparams,
) -> _Plan:
    plan = _Plan(
        pairs=[(p + request.prompt, request.target_new) for p in prefixes],
        cols=[lookup_index(tokenizer, p, request) for p in prefixes],
        kl_rows=[],
        kl_cols=[],
        kl_read=[],
        kl_weights=[],
    )
    # Rows whose next-token distributions must not move: ROME's "essence" ("{subject} is a",
    # read after the subject) and the neighbour prompts (read after their last token).
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
            plan.kl_rows.append(ids)
            plan.kl_cols.append(col)
            plan.kl_read.append(col if at_subject else len(ids) - 1)
            plan.kl_weights.append(factor)
    if hp.after_factor > 0:  # the bare prompt with its new answer, read after the answer
        ids = encode(tokenizer, f"{request.prompt} {request.target_new}")
        plan.kl_rows.append(ids)
        plan.kl_cols.append(plan.cols[0])
        plan.kl_read.append(len(ids) - 1)
        plan.kl_weights.append(hp.after_factor)
    return plan


@dataclass(frozen=True)
class _Pass:
    """The rows of the requests still optimising, laid out for one forward pass: every
    request's prompt rows, then every request's KL rows; ``owner`` maps each row to its
    position in ``active``, ``first`` gives each active request's first (bare) prompt row and
    ``n_rows`` its number of prompt rows."""

    active: list[int]
    batch: TargetBatch
    rows: _Rows
    owner: torch.Tensor
    n_prompts: int
    first: list[int]
    n_rows: torch.Tensor
    kl_at: list[int]
    kl_owner: torch.Tensor
    kl_weight: torch.Tensor
    head: _Head | None = None


def _layout(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    plans: Sequence[_Plan],
    active: list[int],
    hp: ValueHparams,
    head: _Head | None = None,
    bare: frozenset[int] = frozenset(),
) -> _Pass:
    """The pass for the requests ``active``, those in ``bare`` with their bare prompt only;
    ``head``: the cached tokens of an earlier pass of the same chunk that had every row of
    these requests (packed layout only)."""
    import torch

    device = model_device(model)
    used = {i: range(1 if i in bare else len(plans[i].pairs)) for i in active}
    pairs = [plans[i].pairs[j] for i in active for j in used[i]]
    cols = [plans[i].cols[j] for i in active for j in used[i]]
    kl_rows = [row for i in active for row in plans[i].kl_rows]
    kl_read = [r for i in active for r in plans[i].kl_read]
    cols += [c for i in active for c in plans[i].kl_cols]
    owner = [k for k, i in enumerate(active) for _ in used[i]]
    kl_owner = [k for k, i in enumerate(active) for _ in plans[i].kl_rows]
    counts = [len(used[i]) for i in active]
    batch = target_batch(tokenizer, pairs, device, extra_rows=kl_rows, extra_keep=kl_read)
    if hp.prefix_cache and _takes_custom_mask(model):
        width = 1 + max(len(p.pairs) + len(p.kl_rows) for p in plans)
        row_ids = [i * width + j for i in active for j in used[i]]
        row_ids += [
            i * width + len(plans[i].pairs) + j
            for i in active
            for j in range(len(plans[i].kl_rows))
        ]
        rows, head = _packed_rows(model, batch.ids, batch.keep, cols, row_ids, head)
    else:
        rows = _rows(
            model, batch.ids, batch.mask, batch.keep, cols, hp.prefix_cache, pad_id(tokenizer)
        )
    n_prompts = len(pairs)
    return _Pass(
        active=active,
        batch=batch,
        rows=rows,
        owner=torch.tensor(owner + kl_owner, dtype=torch.long, device=device),
        n_prompts=n_prompts,
        first=[sum(counts[:k]) for k in range(len(active))],
        n_rows=torch.tensor(counts, device=device, dtype=torch.float32),
        kl_at=[int(batch.flat[n_prompts + j, pos]) for j, pos in enumerate(kl_read)],
        kl_owner=torch.tensor(kl_owner, dtype=torch.long, device=device),
        kl_weight=torch.tensor(
            [w for i in active for w in plans[i].kl_weights], device=device, dtype=torch.float32
        ),
        head=head,
    )


def _optimise_chunk(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module_name: str,
    prefixes: Sequence[str],
    hp: ValueHparams,
    first: int = 0,
) -> list[ValueResult]:
    """Values for ``requests`` (the ``first``-th onward of the caller's list) in one pass."""
    import torch

    from memedit.hooks import edit_output

    plans = [_plan(tokenizer, r, prefixes, hp) for r in requests]
    every = list(range(len(requests)))
    # Requests still on their bare prompt (``bare_until``); the packed layout's cached head is
    # made with every row, so the prefixed rows can join later without a new one.
    bare = set(every) if hp.bare_until > 0 and len(prefixes) > 1 else set()
    head = None
    if bare and hp.prefix_cache and _takes_custom_mask(model):
        head = _layout(model, tokenizer, plans, every, hp).head
    cur = _layout(model, tokenizer, plans, every, hp, head, frozenset(bare))
    deltas: dict[int, torch.Tensor] = {}
    inits: dict[int, torch.Tensor] = {}
    kl_init: dict[int, torch.Tensor] = {}
    results: dict[int, ValueResult] = {}
    live = [True]  # False while a smaller pass is laid out (its cached prefix pass is plain)

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        if not live[0]:
            return out
        rows = cur.rows
        if not deltas:
            for k, i in enumerate(cur.active):  # the bare prompt is each request's first row
                j = cur.first[k]
                inits[i] = out[rows.index[j], rows.cols[j]].detach().float().clone()
                deltas[i] = torch.zeros(
                    out.shape[-1], device=out.device, dtype=torch.float32, requires_grad=True
                )
        add = torch.stack([deltas[i] for i in cur.active]).to(out.dtype)[cur.owner]
        return out.index_put((rows.index, rows.cols), add, accumulate=True)

    opt: torch.optim.Optimizer | None = None
    below = BelowCache(model, module_name)  # the blocks under the edit run once per layout
    with frozen(model), edit_output(model, module_name, add_delta):
        for step in range(hp.v_steps):
            past = copy.deepcopy(cur.rows.past)  # each pass extends the cache it is given
            with (
                below.run(cur),
                row_attention(model, cur.rows.plan) if cur.rows.plan else nullcontext(),
            ):
                logits = forward_logits(
                    model,
                    cur.rows.ids,
                    cur.rows.mask,
                    cur.rows.keep,
                    past_key_values=past,
                    position_ids=cur.rows.positions,
                )
            logp = logits.float().log_softmax(dim=-1)
            prompt_owner = cur.owner[: cur.n_prompts]
            per_request = torch.zeros(len(cur.active), device=logp.device)
            if bare:
                nll = per_request.index_add(0, prompt_owner, cur.batch.nll(logp)) / cur.n_rows
            else:  # every request has all its prompts: the same sums as always
                nll = cur.batch.nll(logp).reshape(len(cur.active), len(prefixes)).mean(dim=1)
            delta = torch.stack([deltas[i] for i in cur.active])
            init = torch.stack([inits[i] for i in cur.active])
            decay = hp.v_weight_decay * delta.norm(dim=1) / init.norm(dim=1).clamp_min(1e-12) ** 2
            loss = nll + decay
            if cur.kl_at:
                now = logp[cur.kl_at]
                if step == 0:
                    for k, i in enumerate(cur.active):
                        kl_init[i] = now[cur.kl_owner == k].detach().clone()
                ref = torch.cat([kl_init[i] for i in cur.active])
                kl = (now.exp() * (now - ref)).sum(dim=-1) * cur.kl_weight
                loss = loss + torch.zeros_like(loss).index_add(0, cur.kl_owner, kl)
            losses, nlls = loss.detach().tolist(), nll.detach().tolist()
            solved = [False] * len(cur.active)
            if hp.stop_at_argmax:
                misses = (~cur.batch.hits(logp)).float()
                solved = (per_request.index_add(0, prompt_owner, misses) == 0).tolist()
            going: list[int] = []
            joined = False
            for k, i in enumerate(cur.active):
                logger.debug(
                    "value %d step %d: loss %.4f nll %.4f%s",
                    first + i,
                    step,
                    losses[k],
                    nlls[k],
                    " (bare)" if i in bare else "",
                )
                if i in bare and step < hp.v_steps - 1:
                    if nlls[k] < hp.bare_until:  # its prefixed prompts join from the next pass
                        bare.discard(i)
                        joined = True
                    going.append(i)
                elif nlls[k] < hp.early_stop_loss or solved[k] or step == hp.v_steps - 1:
                    target = inits[i] + deltas[i].detach()
                    results[i] = ValueResult(inits[i], target, losses[k], nlls[k], step + 1)
                else:
                    going.append(i)
            if not going:
                break
            if opt is None:
                opt = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)
            keep = [k for k, i in enumerate(cur.active) if i not in results]
            grads = torch.autograd.grad(loss[keep].sum(), [deltas[i] for i in going])
            for d in deltas.values():  # a stopped request has no gradient: Adam skips it
                d.grad = None
            for i, g in zip(going, grads, strict=True):
                deltas[i].grad = g
            opt.step()
            with torch.no_grad():
                for i in going:
                    max_norm = hp.clamp_norm_factor * inits[i].norm()
                    if deltas[i].norm() > max_norm:
                        deltas[i].mul_(max_norm / deltas[i].norm())
            if going != cur.active or joined:
                live[0] = False
                try:
                    cur = _layout(model, tokenizer, plans, going, hp, cur.head, frozenset(bare))
                finally:
                    live[0] = True
    return [results[i] for i in range(len(requests))]
