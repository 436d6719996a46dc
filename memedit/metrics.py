"""KnowEdit's teacher-forced metrics, as EasyEdit computes them.

EasyEdit (``easyeditor/evaluate/evaluate_utils.py::test_prediction_acc``) joins each prompt and
target with one space, runs the model once on the joined text and compares, at every target
position, the argmax of the previous position's logits with the target token:

* Edit Succ. / rephrase / portability (``compute_rewrite_or_rephrase_quality``,
  ``compute_portability_quality``): the share of target tokens predicted correctly;
* Locality (``compute_locality_quality``, then ``np.mean(np.equal(pre, post))`` in
  ``editor.py``): the argmax tokens at the target positions before and after an edit, and the
  share of them that agree.

As in EasyEdit, the target positions are the tokens of ``prompt + " " + target`` after the first
``len(tokenizer(prompt))`` tokens (the prompt tokenized alone, special tokens included). Where
EasyEdit finds those positions by counting pad tokens (correct for left padding only, and wrong
when the pad token also occurs in the text, as with SmolLM2's ``<|im_end|>``), this module uses
the attention mask, so left and right padding give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["locality_agreement", "predicted_tokens", "teacher_forced_accuracy"]


def _check(prompts: Sequence[str], targets: Sequence[str], batch_size: int) -> None:
    if isinstance(prompts, str) or isinstance(targets, str):
        msg = "prompts and targets must be sequences of strings, not a single string"
        raise InvalidRequestError(msg, field="prompts", value=prompts)
    if len(prompts) != len(targets):
        msg = f"{len(prompts)} prompts but {len(targets)} targets"
        raise InvalidRequestError(msg, field="targets", value=len(targets))
    if not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}"
        raise InvalidRequestError(msg, field="batch_size", value=batch_size)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover - unreachable


def _target_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    add_special_tokens: bool,
) -> list[tuple[list[int], list[int]]]:
    """(argmax predictions, target tokens) at the target positions of every pair."""
    import torch

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        chunk_t = targets[start : start + batch_size]
        rows: list[list[int]] = []
        n_prompt: list[int] = []
        for p, t in zip(chunk_p, chunk_t, strict=True):
            joined = tokenizer(f"{p} {t}", add_special_tokens=add_special_tokens)["input_ids"]
            alone = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
            rows.append(list(joined))
            n_prompt.append(min(len(alone), len(joined)))
        width = max(len(r) for r in rows)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        offsets: list[int] = []
        for i, r in enumerate(rows):
            off = width - len(r) if left else 0
            offsets.append(off)
            if r:
                ids[i, off : off + len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, off : off + len(r)] = 1
        with torch.no_grad():
            logits: torch.Tensor = model(
                input_ids=ids.to(device), attention_mask=mask.to(device)
            ).logits
        argmax = logits.argmax(dim=-1).cpu().tolist()
        for i, r in enumerate(rows):
            first = max(n_prompt[i], 1)  # the very first token has nothing before it
            positions = range(offsets[i] + first, offsets[i] + len(r))
            preds = [int(argmax[i][pos - 1]) for pos in positions]
            out.append((preds, r[first:]))
    return out


def teacher_forced_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[float]:
    """KnowEdit's Edit Succ. per pair: the share of the target's tokens (after
    ``prompt + " " + target``) whose teacher-forced argmax equals the token.

    A pair whose target adds no token (EasyEdit drops it) gives ``nan``, so the result always
    has one value per prompt. ``add_special_tokens=False`` for text that already carries them
    (a chat template).
    """
    _check(prompts, targets, batch_size)
    pairs = _target_predictions(model, tokenizer, prompts, targets, batch_size, add_special_tokens)
    return [
        sum(int(p == t) for p, t in zip(preds, labels, strict=True)) / len(labels)
        if labels
        else math.nan
        for preds, labels in pairs
    ]


def predicted_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """The teacher-forced argmax token at each target position of ``prompt + " " + target``
    (what KnowEdit's Locality compares before and after an edit)."""
    _check(prompts, targets, batch_size)
    pairs = _target_predictions(model, tokenizer, prompts, targets, batch_size, add_special_tokens)
    return [preds for preds, _ in pairs]


def locality_agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """Share of positions where the two token lists agree (KnowEdit's Locality for one probe).

    Both come from :func:`predicted_tokens` on the same prompt and answer, so they have the
    same length; different lengths raise. Two empty lists give ``nan`` (as ``np.mean([])``).
    """
    if len(before) != len(after):
        msg = f"token lists differ in length: {len(before)} before vs {len(after)} after"
        raise InvalidRequestError(msg, field="after", value=len(after))
    if not before:
        return math.nan
    return sum(int(a == b) for a, b in zip(before, after, strict=True)) / len(before)
