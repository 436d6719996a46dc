"""Batched generation gives what one-at-a-time greedy generation gives; first-line stopping;
exact repeats of an edit's prompt are always routed in scope."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from memedit import EditRequest
from memedit.editable import EditableModel, RouterConfig
from memedit.generation import batch_generate, greedy_generate
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath
from .tiny import tiny_llama

PROMPTS = [
    "The place of death of Leo Arons is",
    "Q: What is the name of the spouse of a person? A:",
    "The sky is",
    "Where did Leo Arons die? The capital of France is Paris and the",
]


def test_batched_generation_matches_one_at_a_time() -> None:
    model, tok = tiny_llama()
    budgets = [3, 7, 1, 5]
    one = [
        greedy_generate(model, tok, p, max_new_tokens=b)
        for p, b in zip(PROMPTS, budgets, strict=True)
    ]
    many = batch_generate(model, tok, PROMPTS, max_new_tokens=budgets, batch_size=3)
    assert many == one
    assert batch_generate(model, tok, PROMPTS[:1], max_new_tokens=7) == [
        greedy_generate(model, tok, PROMPTS[0], max_new_tokens=7)
    ]


def test_first_line_stops_after_a_line_break() -> None:
    model, tok = tiny_llama()
    full = batch_generate(model, tok, PROMPTS, max_new_tokens=12)
    cut = batch_generate(model, tok, PROMPTS, max_new_tokens=12, first_line=True)
    for f, c in zip(full, cut, strict=True):
        assert f.startswith(c)  # the same greedy tokens, possibly fewer of them
        body = c.lstrip()
        if "\n" in body:  # stopped within a token of the first line break
            assert body.split("\n", 1)[0] == f.lstrip().split("\n", 1)[0]


class NeverScope:
    name = "never"
    threshold = 0.5

    def score(self, query: str, candidates: Sequence[EditRequest]) -> list[float]:
        return [0.0] * len(candidates)

    def score_batch(self, pairs: Sequence[tuple[str, EditRequest]]) -> list[float]:
        return [0.0] * len(pairs)


def test_an_edit_prompt_asked_verbatim_is_always_in_scope(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    mem = EditMemory.open(tmp_path / "m", embedder=HashingEmbedder())
    with EditableModel(
        model, tok, memory=mem, scope=NeverScope(), counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=3), model_name="tiny",
    ) as em:  # fmt: skip
        req = EditRequest(
            prompt="The place of death of Leo Arons is",
            target_new="Paris",
            rephrase=("Where did Leo Arons die?",),
        )
        em.edit(req)
        assert em.route("the place of death of  Leo Arons is").in_scope
        assert not em.route("Where did Leo Arons die?").in_scope  # rephrasings are not exempt
        assert not em.route("The sky is").in_scope
        answers = em.generate_batch([req.prompt, "The sky is"], max_new_tokens=[2, 2])
        assert [a.decision.in_scope for a in answers] == [True, False]


def test_generation_can_run_past_the_end_of_sequence_token() -> None:
    model, tok = tiny_llama()
    calls = {"n": 0}

    def eos_first(_module: object, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:  # the first new token is the end-of-sequence token
            logits = logits.clone()
            logits[..., -1, tok.eos_token_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(eos_first)
    try:
        stopped = greedy_generate(model, tok, "The sky is", max_new_tokens=6)
        calls["n"] = 0
        full = greedy_generate(model, tok, "The sky is", max_new_tokens=6, stop_at_eos=False)
    finally:
        handle.remove()
    assert stopped == ""  # ended at once
    # five more tokens follow the end-of-sequence token (which is not decoded)
    assert full and full == greedy_generate(model, tok, "The sky is</s>", max_new_tokens=5)


def test_answer_line_complete_follows_the_judged_line() -> None:
    from memedit.generation import answer_line_complete
    from memedit.metrics_generation import answer_matches

    prompt = "The capital of France is"
    assert not answer_line_complete(" Paris", prompt)  # the line may go on
    assert answer_line_complete(" Paris.\nIt is", prompt)
    assert not answer_line_complete("\n\n Paris", prompt)  # blank lines first: not yet
    assert not answer_line_complete(" The capital of Fr", prompt)  # repeating the prompt
    assert not answer_line_complete(" The capital of France is\n", prompt)
    assert answer_line_complete(" The capital of France is\nParis\n", prompt)
    # once complete, more text does not change the verdict answer_matches reads
    for text in (" Paris.\n", " The capital of France is\nParis\n", "\n Lyon\n"):
        assert answer_line_complete(text, prompt)
        for extra in ("Berlin", "\nParis", " Paris"):
            assert answer_matches(text, "Paris", prompt=prompt) == answer_matches(
                text + extra, "Paris", prompt=prompt
            )


def test_rows_stop_per_row_at_budget_or_judged_line() -> None:
    from memedit.generation import rows_stop

    _, tok = tiny_llama()
    prompt = tok("Q: where?", add_special_tokens=False)["input_ids"]
    texts = [" Paris.\nmore", " Paris", " Paris"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])[:, : len(rows[1])]
    n_new = len(rows[1]) - len(prompt)
    crit = rows_stop(
        tok, len(prompt), [99, 99, n_new], answer_prompts=["Q: where?"] * 3, first_line=False
    )
    done = crit(ids, None).tolist()
    # row 0 holds "Paris." + line break within its first n_new tokens only if tokenised so
    first = str(tok.decode(ids[0, len(prompt) :].tolist(), skip_special_tokens=True))
    assert done == ["\n" in first.lstrip(), False, True]
