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

ConvSent (EasyEdit ``evaluate.py::compute_sent_metric`` with ``evaluate_utils.py::es`` and
``kl_loc_loss``) is teacher-forced too and lives here: the per-token log-probabilities of a
completion (:func:`completion_token_logprobs`), the next-token distributions over it
(:func:`next_token_logprobs`), and the pure combinations :func:`convsent_success` and
:func:`convsent_kl`. EasyEdit builds each ConvSent text as ``question + " </s> " + answer``; pass
``convsent_prompt(question)`` as the prompt and the answer as the completion to get that text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONVSENT_SEPARATOR",
    "completion_log_likelihood",
    "completion_token_logprobs",
    "convsent_kl",
    "convsent_prompt",
    "convsent_score",
    "convsent_success",
    "locality_agreement",
    "next_token_logprobs",
    "pooled_mean",
    "predicted_tokens",
    "teacher_forced_accuracy",
]

CONVSENT_SEPARATOR = "</s>"
"""What EasyEdit's ConvSent script puts between the question and the answer (Llama's EOS)."""

# (offset of the row's first real token, index of the first target token, token ids)
_Row = tuple[int, int, list[int]]


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


def _forward_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    add_special_tokens: bool,
) -> Iterator[tuple[torch.Tensor, list[_Row]]]:
    """Run the model on ``prompt + " " + target`` in padded batches; yield each batch's logits
    (on the model's device) with one :data:`_Row` per pair. The first target index is at least
    1: the very first token has nothing before it to predict it."""
    import torch

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for start in range(0, len(prompts), batch_size):
        chunk = zip(
            prompts[start : start + batch_size], targets[start : start + batch_size], strict=True
        )
        encoded: list[tuple[list[int], int]] = []
        for p, t in chunk:
            joined = list(tokenizer(f"{p} {t}", add_special_tokens=add_special_tokens)["input_ids"])
            alone = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
            encoded.append((joined, max(min(len(alone), len(joined)), 1)))
        width = max(len(r) for r, _ in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        rows: list[_Row] = []
        for i, (r, first) in enumerate(encoded):
            off = width - len(r) if left else 0
            if r:
                ids[i, off : off + len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, off : off + len(r)] = 1
            rows.append((off, first, r))
        with torch.no_grad():
            logits: torch.Tensor = model(
                input_ids=ids.to(device), attention_mask=mask.to(device)
            ).logits
        yield logits, rows


def _target_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    add_special_tokens: bool,
) -> list[tuple[list[int], list[int]]]:
    """(argmax predictions, target tokens) at the target positions of every pair."""
    out: list[tuple[list[int], list[int]]] = []
    batches = _forward_batches(model, tokenizer, prompts, targets, batch_size, add_special_tokens)
    for logits, rows in batches:
        argmax = logits.argmax(dim=-1).cpu().tolist()
        for i, (off, first, r) in enumerate(rows):
            preds = [int(argmax[i][pos - 1]) for pos in range(off + first, off + len(r))]
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


# --- ConvSent ---------------------------------------------------------------------------------


def convsent_prompt(question: str) -> str:
    """The prompt EasyEdit scores ConvSent answers after: ``question + " </s>"``; with the
    answer as completion (joined by one space) this is EasyEdit's ``q + " </s> " + answer``."""
    return f"{question} {CONVSENT_SEPARATOR}"


def completion_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[list[float]]:
    """Teacher-forced ``log p(token | everything before it)`` of each completion token of
    ``prompt + " " + completion`` (the same target positions as :func:`teacher_forced_accuracy`).

    This is the quantity EasyEdit's ConvSent ``es`` averages, with one deliberate difference:
    EasyEdit gathers the log-probability of token *t* from the logits *at* position *t* (no
    shift, i.e. the probability of repeating the current token), and includes the separator
    and pad positions; here token *t* is scored by the logits at *t - 1*, the model's actual
    prediction of it, over the completion tokens only.
    """
    _check(prompts, completions, batch_size)
    import torch

    out: list[list[float]] = []
    batches = _forward_batches(
        model, tokenizer, prompts, completions, batch_size, add_special_tokens
    )
    for logits, rows in batches:
        logp = logits.float().log_softmax(dim=-1)
        for i, (off, first, r) in enumerate(rows):
            if first >= len(r):
                out.append([])
                continue
            pos = torch.arange(off + first - 1, off + len(r) - 1, device=logp.device)
            tgt = torch.tensor(r[first:], dtype=torch.long, device=logp.device)
            out.append(logp[i, pos].gather(-1, tgt[:, None]).squeeze(-1).cpu().tolist())
    return out


def completion_log_likelihood(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[float]:
    """Mean per-token log-probability of each completion after its prompt (``nan`` where the
    completion adds no token). See :func:`completion_token_logprobs`."""
    per_token = completion_token_logprobs(
        model,
        tokenizer,
        prompts,
        completions,
        batch_size=batch_size,
        add_special_tokens=add_special_tokens,
    )
    return [sum(v) / len(v) if v else math.nan for v in per_token]


def next_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[torch.Tensor]:
    """Per pair, the log-softmax next-token distributions (float32, CPU) at the positions
    ConvSent's KL locality compares: from the prompt's last token to the text's last token,
    ``n_completion_tokens + 1`` rows of vocabulary size. (EasyEdit's ``compute_sent_metric``
    masks everything before the ``</s>`` separator, i.e. keeps the separator's position and
    all after it.) Compute them before an edit, again after, and pass both to
    :func:`convsent_kl`."""
    _check(prompts, completions, batch_size)
    out: list[torch.Tensor] = []
    batches = _forward_batches(
        model, tokenizer, prompts, completions, batch_size, add_special_tokens
    )
    for logits, rows in batches:
        for i, (off, first, r) in enumerate(rows):
            window = logits[i, off + first - 1 : off + len(r)]
            out.append(window.float().log_softmax(dim=-1).cpu())
    return out


def pooled_mean(token_values: Sequence[Sequence[float]]) -> float:
    """Mean over all tokens of all sequences (token-weighted, as EasyEdit's ``masked_mean``
    over a padded batch); ``nan`` when there are no tokens."""
    total = sum(len(v) for v in token_values)
    if total == 0:
        return math.nan
    return sum(sum(v) for v in token_values) / total


def convsent_score(mean_pos_post: float, mean_neg_post: float, mean_pos_pre: float) -> float:
    """EasyEdit's ConvSent Edit Succ. (``evaluate_utils.py::es``) from three mean token
    log-likelihoods: ``sigmoid(pos_post - neg_post) * min(1, exp(pos_post - pos_pre))``.

    ``pos`` are the answers with the edit's target sentiment about the edited topic, ``neg``
    those with the opposite sentiment; ``post`` under the edited model, ``pre`` under the
    model before the edit. The first factor rewards preferring the target sentiment, the
    second penalises lowering the likelihood of on-topic answers. ``nan`` in, ``nan`` out.
    """
    values = (mean_pos_post, mean_neg_post, mean_pos_pre)
    if any(math.isnan(v) for v in values):
        return math.nan
    d = mean_pos_post - mean_neg_post
    z_sent = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
    topic = mean_pos_post - mean_pos_pre
    z_topic = 1.0 if topic >= 0 else math.exp(topic)
    return z_sent * z_topic


def convsent_success(
    pos_pre: Sequence[Sequence[float]],
    pos_post: Sequence[Sequence[float]],
    neg_post: Sequence[Sequence[float]],
) -> float:
    """ConvSent Edit Succ. of one edit from per-token log-probabilities (lists from
    :func:`completion_token_logprobs`): the target-sentiment answers before and after the
    edit, and the opposite-sentiment answers after it. Each group is pooled over all its
    tokens, as EasyEdit's ``masked_mean`` does, then combined by :func:`convsent_score`.

    EasyEdit's script computes "before" with ``self.model`` after the edit was applied in
    place (ROME, MEMIT, FT), so there pre equals post and the topic factor is always 1; here
    ``pos_pre`` must really come from the unedited model.
    """
    if len(pos_pre) != len(pos_post) or any(
        len(a) != len(b) for a, b in zip(pos_pre, pos_post, strict=False)
    ):
        msg = "pos_pre and pos_post must score the same answers (same count and token lengths)"
        raise InvalidRequestError(msg, field="pos_post", value=len(pos_post))
    return convsent_score(pooled_mean(pos_post), pooled_mean(neg_post), pooled_mean(pos_pre))


def convsent_kl(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> float:
    """ConvSent locality (EasyEdit ``kl_loc_loss``): ``KL(pre || post)`` of the next-token
    distributions, averaged over every position of every text (pooled, as EasyEdit's masked
    mean over the batch). Lower is better; 0 when the edit left them unchanged. Takes the
    tensors of :func:`next_token_logprobs` (raw logits work too: both are log-softmaxed) on
    answers about a different topic than the edited one. ``nan`` when there are no positions.
    """
    if len(pre) != len(post):
        msg = f"{len(pre)} pre-edit tensors but {len(post)} post-edit tensors"
        raise InvalidRequestError(msg, field="post", value=len(post))
    total, count = 0.0, 0
    for i, (a, b) in enumerate(zip(pre, post, strict=True)):
        if a.shape != b.shape:
            msg = f"pre[{i}] has shape {tuple(a.shape)} but post[{i}] {tuple(b.shape)}"
            raise InvalidRequestError(msg, field=f"post[{i}]", value=tuple(b.shape))
        lp, lq = a.float().log_softmax(dim=-1), b.float().log_softmax(dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
        count += int(a.shape[0]) if a.dim() > 1 else 1
    return total / count if count else math.nan
