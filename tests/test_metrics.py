"""KnowEdit's teacher-forced metrics (Edit Succ., Locality, ConvSent), pinned on hand-computed
cases."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from memedit.errors import InvalidRequestError
from memedit.metrics import (
    completion_log_likelihood,
    completion_token_logprobs,
    convsent_kl,
    convsent_prompt,
    convsent_score,
    convsent_success,
    locality_agreement,
    next_token_logprobs,
    pooled_mean,
    predicted_tokens,
    teacher_forced_accuracy,
)
from tests.tiny import tiny_llama, tiny_tokenizer


class BigramModel(nn.Module):
    """Predicts the next token from the current one with a fixed table (hand-checkable)."""

    def __init__(self, vocab: int, table: dict[int, int]) -> None:
        super().__init__()
        self.vocab = vocab
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.seen.append(attention_mask.clone())
        nxt = input_ids.clone().apply_(lambda t: self.table.get(t, 0))
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).float())


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def test_accuracy_is_share_of_target_tokens_predicted_after_prompt_plus_space() -> None:
    tok = tiny_tokenizer()
    prompt, target = "Where did Leo Arons", "die? The capital"
    joined = _ids(tok, f"{prompt} {target}")
    n_prompt = len(_ids(tok, prompt))
    labels = joined[n_prompt:]
    assert len(labels) >= 3 and len(set(joined)) == len(joined)  # a clean hand-checkable case
    table = {a: b for a, b in itertools.pairwise(joined)}
    model = BigramModel(len(tok), table)
    assert teacher_forced_accuracy(model, tok, [prompt], [target]) == [1.0]
    assert predicted_tokens(model, tok, [prompt], [target]) == [labels]

    # Break the prediction of the second target token only: accuracy (n-1)/n.
    broken = dict(table)
    broken[labels[0]] = labels[0]
    model = BigramModel(len(tok), broken)
    n = len(labels)
    assert teacher_forced_accuracy(model, tok, [prompt], [target]) == [(n - 1) / n]
    assert predicted_tokens(model, tok, [prompt], [target]) == [[labels[0], labels[0], *labels[2:]]]

    # The prompt's own tokens never count: a table wrong everywhere in the prompt scores 1.0.
    prompt_only = {a: a for a in joined[: n_prompt - 1]}
    model = BigramModel(len(tok), {**table, **prompt_only})
    assert teacher_forced_accuracy(model, tok, [prompt], [target]) == [1.0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_and_batching_do_not_change_results(side: str) -> None:
    model, tok = tiny_llama()
    tok.padding_side = side
    prompts = ["The sky is", "Where did Leo Arons die? The capital of France is", "Q: A:"]
    targets = ["blue", "Paris", "What is the name of the spouse"]
    expected_acc, expected_tok = [], []
    for p, t in zip(prompts, targets, strict=True):  # one unpadded sequence at a time, by hand
        joined = _ids(tok, f"{p} {t}")
        n = len(_ids(tok, p))
        with torch.no_grad():
            logits = model(torch.tensor([joined])).logits[0]
        preds = [int(logits[i - 1].argmax()) for i in range(n, len(joined))]
        expected_tok.append(preds)
        expected_acc.append(
            sum(a == b for a, b in zip(preds, joined[n:], strict=True)) / len(preds)
        )
    for batch_size in (1, 2, 8):
        got = teacher_forced_accuracy(model, tok, prompts, targets, batch_size=batch_size)
        assert got == pytest.approx(expected_acc)
        assert predicted_tokens(model, tok, prompts, targets, batch_size=batch_size) == expected_tok


def test_pad_token_inside_the_text_is_not_mistaken_for_padding() -> None:
    tok = tiny_tokenizer()
    prompt, target = f"The sky{tok.pad_token} is", "blue"
    joined = _ids(tok, f"{prompt} {target}")
    model = BigramModel(len(tok), {a: b for a, b in itertools.pairwise(joined)})
    # Batched with a longer row so that this one is padded too.
    long_p, long_t = "Where did Leo Arons die? The capital of France is", "Paris"
    long_j = _ids(tok, f"{long_p} {long_t}")
    model.table.update({a: b for a, b in itertools.pairwise(long_j)})
    model.table.update({a: b for a, b in itertools.pairwise(joined)})
    got = teacher_forced_accuracy(model, tok, [prompt, long_p], [target, long_t])
    assert got[0] == 1.0
    assert model.seen[-1][0].sum() == len(joined)  # the mask covers exactly the real tokens


def test_locality_agreement() -> None:
    assert locality_agreement([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert locality_agreement([5], [5]) == 1.0
    assert locality_agreement([5, 6], [7, 8]) == 0.0
    assert math.isnan(locality_agreement([], []))
    with pytest.raises(InvalidRequestError, match="differ in length"):
        locality_agreement([1, 2], [1])


def test_bad_arguments_are_rejected() -> None:
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 targets"):
        teacher_forced_accuracy(model, tok, ["a", "b"], ["c"])
    with pytest.raises(InvalidRequestError, match="batch_size"):
        predicted_tokens(model, tok, ["a"], ["c"], batch_size=0)
    with pytest.raises(InvalidRequestError, match="single string"):
        teacher_forced_accuracy(model, tok, "a", "c")  # type: ignore[arg-type]
    assert teacher_forced_accuracy(model, tok, [], []) == []


# --- ConvSent ---------------------------------------------------------------------------------


def test_convsent_score_on_given_numbers() -> None:
    # sigmoid(-1 - -3) = sigmoid(2); the topic factor is capped at 1 when the edit raised pos.
    assert convsent_score(-1.0, -3.0, -1.5) == pytest.approx(0.8807970779778823, rel=1e-12)
    # sigmoid(-1) * exp(-1): prefers the wrong sentiment and lowered on-topic likelihood.
    assert convsent_score(-2.0, -1.0, -1.0) == pytest.approx(0.0989380198014472, rel=1e-12)
    assert convsent_score(-1.0, -1.0, -1.0) == 0.5
    assert convsent_score(0.0, -1000.0, -5.0) == 1.0  # no overflow at the extremes
    assert convsent_score(-1000.0, 0.0, 0.0) == 0.0
    assert math.isnan(convsent_score(math.nan, -1.0, -1.0))


def test_pooled_mean_weights_tokens_not_texts() -> None:
    assert pooled_mean([[-1.0, -2.0], [-3.0]]) == -2.0  # a per-text mean would give -2.25
    assert math.isnan(pooled_mean([[], []]))


def test_convsent_success_pools_each_group() -> None:
    # pos after: mean -2 (= pos before, topic factor 1); neg after: -4 -> sigmoid(2).
    got = convsent_success(pos_pre=[[-2.0, -2.0]], pos_post=[[-1.0, -3.0]], neg_post=[[-4.0]])
    assert got == pytest.approx(0.8807970779778823, rel=1e-12)
    # pos after pooled over both answers: (-1 - 3 - 2) / 3 = -2 again.
    got = convsent_success([[-2.0, -2.0], [-2.0]], [[-1.0, -3.0], [-2.0]], [[-3.0], [-5.0]])
    assert got == pytest.approx(0.8807970779778823, rel=1e-12)
    with pytest.raises(InvalidRequestError, match="same answers"):
        convsent_success([[-1.0]], [[-1.0, -2.0]], [[-1.0]])


def test_convsent_kl_on_hand_computed_distributions() -> None:
    half = torch.tensor([[0.5, 0.5]]).log()
    skew = torch.tensor([[0.25, 0.75]]).log()
    kl = 0.5 * math.log(4 / 3)  # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    assert convsent_kl([half], [skew]) == pytest.approx(kl, rel=1e-6)
    assert convsent_kl([half], [half]) == 0.0
    # Pooled over positions: one changed position among four in two texts gives kl / 4.
    same3 = torch.tensor([[0.1, 0.9]] * 3).log()
    assert convsent_kl([half, same3], [skew, same3]) == pytest.approx(kl / 4, rel=1e-6)
    assert convsent_kl([half * 3.0], [skew]) > 0  # raw logits are log-softmaxed first
    assert math.isnan(convsent_kl([], []))
    with pytest.raises(InvalidRequestError, match="shape"):
        convsent_kl([half], [same3])
    with pytest.raises(InvalidRequestError, match="1 pre-edit tensors but 0"):
        convsent_kl([half], [])


def test_completion_logprobs_score_each_token_by_the_previous_position() -> None:
    tok = tiny_tokenizer()
    prompt, completion = "Where did Leo Arons", "die? The capital"
    joined = _ids(tok, f"{prompt} {completion}")
    n_prompt = len(_ids(tok, prompt))
    labels = joined[n_prompt:]
    table = {a: b for a, b in itertools.pairwise(joined)}
    model = BigramModel(len(tok), table)  # one-hot logits: the table's token has logit 1
    hit = 1 - math.log(math.e + len(tok) - 1)  # log softmax of the logit-1 entry
    miss = -math.log(math.e + len(tok) - 1)
    got = completion_token_logprobs(model, tok, [prompt], [completion])
    assert got == [pytest.approx([hit] * len(labels))]

    # Break the prediction of the second completion token only.
    model = BigramModel(len(tok), {**table, labels[0]: labels[0]})
    got = completion_token_logprobs(model, tok, [prompt], [completion])
    assert got == [pytest.approx([hit, miss, *[hit] * (len(labels) - 2)])]
    mean = completion_log_likelihood(model, tok, [prompt, prompt], [completion, "blue sky"])
    assert mean[0] == pytest.approx((hit * (len(labels) - 1) + miss) / len(labels))
    assert mean[0] > mean[1]  # the completion the model is forced towards scores higher


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_logprobs_match_unbatched_computation(side: str) -> None:
    model, tok = tiny_llama()
    tok.padding_side = side
    prompts = [convsent_prompt("What do you think of Paris?"), "The sky is", "Q: A:"]
    completions = [" I really like it. ", "blue", "What is the name of the spouse"]
    assert prompts[0] == "What do you think of Paris? </s>"
    expected_lp, expected_dist = [], []
    for p, c in zip(prompts, completions, strict=True):
        joined = _ids(tok, f"{p} {c}")
        n = len(_ids(tok, p))
        with torch.no_grad():
            logp = model(torch.tensor([joined])).logits[0].log_softmax(-1)
        expected_lp.append([float(logp[i - 1, joined[i]]) for i in range(n, len(joined))])
        expected_dist.append(logp[n - 1 :])
    for batch_size in (1, 2, 8):
        got = completion_token_logprobs(model, tok, prompts, completions, batch_size=batch_size)
        assert [len(g) for g in got] == [len(e) for e in expected_lp]
        for g, e in zip(got, expected_lp, strict=True):
            assert g == pytest.approx(e, abs=1e-4)
        dists = next_token_logprobs(model, tok, prompts, completions, batch_size=batch_size)
        for d, e, lp in zip(dists, expected_dist, expected_lp, strict=True):
            assert d.shape == (len(lp) + 1, len(tok))  # completion tokens + the final position
            assert torch.allclose(d, e, atol=1e-4)
            assert torch.allclose(d.exp().sum(-1), torch.ones(d.shape[0]), atol=1e-5)


def test_convsent_kl_between_models() -> None:
    model, tok = tiny_llama(seed=0)
    other, _ = tiny_llama(seed=1)
    prompts = [convsent_prompt("What is your view on Berlin?")] * 2
    answers = [" I love it.", " It is too cold."]
    pre = next_token_logprobs(model, tok, prompts, answers)
    assert convsent_kl(pre, next_token_logprobs(model, tok, prompts, answers)) == pytest.approx(
        0.0, abs=1e-6
    )
    post = next_token_logprobs(other, tok, prompts, answers)
    kls = [float((p.exp() * (p - q)).sum()) for p, q in zip(pre, post, strict=True)]
    by_hand = sum(kls) / sum(p.shape[0] for p in pre)
    assert convsent_kl(pre, post) == pytest.approx(by_hand, rel=1e-5)
    assert convsent_kl(pre, post) > 0.0


def test_convsent_helpers_reject_bad_arguments() -> None:
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 targets"):
        completion_token_logprobs(model, tok, ["a", "b"], ["c"])
    with pytest.raises(InvalidRequestError, match="batch_size"):
        next_token_logprobs(model, tok, ["a"], ["c"], batch_size=0)
    assert completion_log_likelihood(model, tok, [], []) == []
