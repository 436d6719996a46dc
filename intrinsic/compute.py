"""The math every locate-then-edit method shares: token positions, keys, least squares.

* Where a fact is looked up: the last token of the subject (:func:`subject_token_index`).
* Keys: the inputs of a layer's MLP output projection at that token, averaged over context
  prefixes (:func:`subject_keys`; ROME's ``compute_u`` before the covariance, MEMIT's
  ``compute_ks``). Forward passes stop at the module they need (:func:`capture`).
* Updates, solved in float64: ROME's equality-constrained rank-one update
  (:func:`rank_one_update`) and MEMIT's batched least squares (:func:`least_squares_update`),
  both on top of one symmetric positive-definite solve (:func:`solve_psd`).

Inputs are tokenized as the KnowEdit metrics tokenize them (``memedit.metrics``): special tokens
added, ``prompt + " " + target``, the target being what follows the tokens of the prompt alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError
from memedit.spec import cache_keyword

from .errors import NonFiniteUpdateError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = [
    "SubjectKeys",
    "TargetBatch",
    "block_name",
    "capture",
    "encode",
    "forward_logits",
    "frozen",
    "least_squares_update",
    "lookup_outputs",
    "mlp_out_name",
    "model_device",
    "pad_right",
    "rank_one_update",
    "solve_psd",
    "subject_keys",
    "subject_token_index",
    "target_batch",
]


# --- addressing ------------------------------------------------------------------------------


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Module path of layer ``layer``'s MLP output projection (the edited matrix)."""
    from memedit.spec import ensure_spec

    return ensure_spec(model).mlp_out.format(layer=layer)


def block_name(model: nn.Module, layer: int) -> str:
    """Module path of transformer block ``layer`` (its output is the residual stream)."""
    from memedit.spec import ensure_spec

    return f"{ensure_spec(model).layers}.{layer}"


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- tokens ----------------------------------------------------------------------------------


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens, as the metrics encode it."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_right(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the sequences, right-padded: positions stay absolute."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def subject_token_index(
    tokenizer: PreTrainedTokenizerBase, text: str, subject_start: int, subject_end: int
) -> int:
    """Index (in :func:`encode` of ``text``) of the token holding the subject's last character.

    ``text[subject_start:subject_end]`` is the subject. With a fast tokenizer the character
    offsets decide; otherwise the text up to the subject's end is tokenized and counted (ROME).
    """
    if not 0 <= subject_start < subject_end <= len(text):
        msg = f"subject span {subject_start}:{subject_end} is not inside a {len(text)}-char text"
        raise InvalidRequestError(msg, field="subject", value=text)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        hits = [
            i
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and a < subject_end and b > subject_start
        ]
        if hits:
            return hits[-1]
    return len(encode(tokenizer, text[:subject_end])) - 1


def lookup_index(tokenizer: PreTrainedTokenizerBase, prefix: str, request: EditRequest) -> int:
    """Where ``prefix + request.prompt`` looks the fact up: the subject's last token, or the
    prompt's last token for a request without a subject."""
    text = prefix + request.prompt
    if not request.subject:
        return len(encode(tokenizer, text)) - 1
    start = len(prefix) + request.prompt.index(request.subject)
    return subject_token_index(tokenizer, text, start, start + len(request.subject))


@dataclass(frozen=True)
class TargetBatch:
    """``prompt + " " + target`` pairs (then any extra rows), right-padded, with the positions
    whose logits predict each target token marked in ``keep`` (plus one chosen position per
    extra row). ``flat[i, j]`` is where position ``j`` of row ``i`` lands in
    :func:`forward_logits`'s output."""

    ids: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    flat: torch.Tensor
    tgt_index: torch.Tensor
    tgt_token: torch.Tensor
    tgt_row: torch.Tensor
    counts: torch.Tensor
    n_pairs: int
    #: With ``after=True``: where each pair's last position (the one predicting what follows
    #: the target) lands in the kept logits.
    after_index: torch.Tensor | None = None

    def nll(self, logp: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of each pair's target tokens, shape (n_pairs,), from
        the log-probabilities at the kept positions."""
        import torch

        token_lp = logp[self.tgt_index, self.tgt_token]
        total = torch.zeros(self.n_pairs, device=logp.device, dtype=logp.dtype)
        return total.index_add(0, self.tgt_row, -token_lp) / self.counts

    def hits(self, logp: torch.Tensor) -> torch.Tensor:
        """Whether every target token of each pair is the argmax at its position (what Edit
        Succ. scores, teacher-forced), shape (n_pairs,), from the kept logits or
        log-probabilities."""
        import torch

        right = (logp[self.tgt_index].argmax(dim=-1) == self.tgt_token).to(self.counts.dtype)
        total = torch.zeros(self.n_pairs, device=logp.device, dtype=self.counts.dtype)
        return total.index_add(0, self.tgt_row, right) == self.counts


def target_batch(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    device: torch.device,
    *,
    extra_rows: Sequence[Sequence[int]] = (),
    extra_keep: Sequence[int] = (),
    after: bool = False,
) -> TargetBatch:
    """Tokenize ``(prompt, target)`` pairs as the KnowEdit metrics do: the target tokens are
    those of ``prompt + " " + target`` after the tokens of the prompt alone. ``after`` also
    keeps each pair's last position (``after_index``)."""
    import torch

    seqs: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for prompt, target in pairs:
        full = encode(tokenizer, f"{prompt} {target}")
        first = max(min(len(encode(tokenizer, prompt)), len(full)), 1)
        if first >= len(full):
            msg = f"target {target!r} adds no token after the prompt {prompt!r}"
            raise InvalidRequestError(msg, field="target_new", value=target)
        seqs.append(full)
        spans.append((first, len(full)))
    seqs.extend(list(r) for r in extra_rows)
    ids, mask = pad_right(seqs, pad_id(tokenizer), device)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(spans):
        keep[i, a - 1 : b - 1 + int(after)] = True
    for j, pos in enumerate(extra_keep):
        keep[len(spans) + j, pos] = True
    flat = keep.flatten().cumsum(0).reshape(keep.shape) - 1
    return TargetBatch(
        ids=ids,
        mask=mask,
        keep=keep,
        flat=flat,
        tgt_index=torch.cat([flat[i, a - 1 : b - 1] for i, (a, b) in enumerate(spans)]),
        tgt_token=torch.cat([ids[i, a:b] for i, (a, b) in enumerate(spans)]),
        tgt_row=torch.cat(
            [torch.full((b - a,), i, dtype=torch.long) for i, (a, b) in enumerate(spans)]
        ).to(device),
        counts=torch.tensor([float(b - a) for a, b in spans], device=device),
        n_pairs=len(spans),
        after_index=torch.stack([flat[i, b - 1] for i, (_, b) in enumerate(spans)])
        if after
        else None,
    )


# --- forward passes --------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed module has run."""


def _stop(_output: torch.Tensor) -> torch.Tensor:
    raise _StopForward


def capture(
    model: nn.Module, module_name: str, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module_name`` for a batch; the forward pass stops right after it."""
    import torch

    from memedit.hooks import edit_output, trace

    with (
        torch.no_grad(),
        trace(model, [module_name], inputs=True, outputs=True) as tr,
        edit_output(model, module_name, _stop),
        suppress(_StopForward),
    ):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return tr.inputs[module_name], tr.outputs[module_name]


def lookup_outputs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module_name: str,
    requests: Sequence[EditRequest],
) -> torch.Tensor:
    """Output of ``module_name`` at each request's lookup token of the bare prompt, (n, width)
    float32 (the point :func:`optimise_value` starts from)."""
    import torch

    seqs = [encode(tokenizer, r.prompt) for r in requests]
    where = [lookup_index(tokenizer, "", r) for r in requests]
    ids, mask = pad_right(seqs, pad_id(tokenizer), model_device(model))
    _, out = capture(model, module_name, ids, mask)
    rows = torch.arange(len(seqs), device=ids.device)
    return out[rows, torch.tensor(where, device=ids.device)].float()


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    past_key_values: Any = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits at the ``True`` positions of the boolean (batch, seq) ``keep``, flattened row-major
    to (n_kept, vocab). Only those positions are projected onto the vocabulary when the model
    supports ``logits_to_keep``. With ``past_key_values`` (a cache of the first tokens of every
    row, which it extends), ``ids`` continue those tokens, ``mask`` covers both and
    ``position_ids`` give the new tokens' positions."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if past_key_values is not None:
        kwargs.update({cache_keyword(model): past_key_values, "use_cache": True})
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts_logits_to_keep(model):
        logits: torch.Tensor = model(**kwargs, logits_to_keep=keep).logits
        if logits.dim() == 2:
            return logits
        if logits.shape[:2] == keep.shape:  # a model that ignored the mask
            return logits[keep]
        return logits.reshape(-1, logits.shape[-1])
    return model(**kwargs).logits[keep]


@contextmanager
def frozen(model: nn.Module, trainable: Sequence[str] = ()) -> Iterator[None]:
    """Only the parameters named in ``trainable`` require grad inside the block; every flag is
    restored after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wanted = set(trainable)
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectKeys:
    """Per request (rows): the key averaged over the context prefixes, and the key and the
    module's output for the bare prompt (the first prefix, ``""``)."""

    mean: torch.Tensor
    clean: torch.Tensor
    clean_out: torch.Tensor


def subject_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
) -> SubjectKeys:
    """Inputs (keys) and outputs of layer ``layer``'s MLP output projection at each request's
    lookup token, for ``prefix + prompt`` over every prefix; ``prefixes[0]`` should be ``""``."""
    import torch

    if not prefixes:
        msg = "subject_keys needs at least one prefix (use '' for the bare prompt)"
        raise InvalidRequestError(msg, field="prefixes", value=prefixes)
    module = mlp_out_name(model, layer)
    seqs, where = [], []
    for r in requests:
        for p in prefixes:
            seqs.append(encode(tokenizer, p + r.prompt))
            where.append(lookup_index(tokenizer, p, r))
    ids, mask = pad_right(seqs, pad_id(tokenizer), model_device(model))
    inputs, outputs = capture(model, module, ids, mask)
    rows = torch.arange(len(seqs), device=ids.device)
    cols = torch.tensor(where, device=ids.device)
    k = inputs[rows, cols].reshape(len(requests), len(prefixes), -1)
    v = outputs[rows, cols].reshape(len(requests), len(prefixes), -1)
    return SubjectKeys(mean=k.float().mean(dim=1), clean=k[:, 0].float(), clean_out=v[:, 0].float())


# --- least squares (float64) -----------------------------------------------------------------


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for a symmetric positive (semi)definite ``a``, in float64.

    Cholesky first; a singular ``a`` (too few tokens in the statistics, dead units) gets a
    growing ridge of ``1e-10 … 1e-4`` times its mean diagonal before falling back to least
    squares."""
    import torch

    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    vec = b64.dim() == 1
    rhs = b64[:, None] if vec else b64
    scale = float(a64.diagonal().abs().mean()) or 1.0
    eye = torch.eye(a64.shape[0], dtype=torch.float64, device=a64.device)
    for ridge in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(a64 + ridge * scale * eye)
        if int(info) == 0:
            x = torch.cholesky_solve(rhs, chol)
            return x[:, 0] if vec else x
    x = torch.linalg.lstsq(a64, rhs).solution
    return x[:, 0] if vec else x


def rank_one_update(
    key_direction: torch.Tensor,
    key: torch.Tensor,
    residual: torch.Tensor,
    cov: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's update ``Δ = r uᵀ / (uᵀ k)`` with ``u = C⁻¹ k̄`` (float64, (out, in)).

    ``W + Δ`` maps ``key`` (the bare prompt's key) to ``W key + residual`` exactly and changes
    ``W`` least along directions frequent in the statistics ``cov`` (identity when None);
    ``key_direction`` is the key averaged over context prefixes."""
    import torch

    u = key_direction.to(torch.float64)
    if cov is not None:
        u = solve_psd(cov, u)
    k = key.to(u.device, torch.float64)
    denom = torch.dot(u, k)
    if not bool(torch.isfinite(denom)) or float(denom.abs()) == 0.0:
        msg = f"rank-one update is undefined: key and C⁻¹·key are orthogonal (uᵀk = {denom})"
        raise NonFiniteUpdateError(msg)
    return torch.outer(residual.to(u.device, torch.float64), u) / denom


def least_squares_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor | None = None
) -> torch.Tensor:
    """MEMIT's update ``Δ = Rᵀ K (C + KᵀK)⁻¹`` (float64, (out, in)): the smallest change — in the
    metric of the (already weighted) key statistics ``cov`` — that moves each key ``K[i]``'s
    output by ``R[i]`` in the least-squares sense. Rows of ``keys`` (n, in) and ``residuals``
    (n, out) are requests."""
    import torch

    k = keys.to(torch.float64)
    r = residuals.to(k.device, torch.float64)
    gram = k.T @ k
    a = gram if cov is None else cov.to(k.device, torch.float64) + gram
    x = solve_psd(a, k.T)  # (in, n) = A⁻¹ Kᵀ
    return r.T @ x.T
