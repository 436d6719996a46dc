"""KnowEdit's teacher-forced metrics, pinned on hand-computed cases."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from memedit.errors import InvalidRequestError
from memedit.metrics import locality_agreement, predicted_tokens, teacher_forced_accuracy
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
