"""EditableModel routing on a tiny random model: out-of-scope queries are untouched, in-scope
queries go through the counterfactual path, edits roll back, bad input writes nothing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.editable import EditableModel, RouterConfig, UnsupportedStrategyError
from memedit.generation import greedy_generate
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .tiny import tiny_llama


class OverlapScope:
    """A deterministic stand-in classifier: in scope iff the query shares the edit's subject."""

    name = "overlap-test"
    threshold = 0.5

    def score(self, query: str, candidates: Sequence[EditRequest]) -> list[float]:
        return [1.0 if c.subject and c.subject in query else 0.0 for c in candidates]

    def score_batch(self, pairs: Sequence[tuple[str, EditRequest]]) -> list[float]:
        return [self.score(q, [c])[0] for q, c in pairs]


class MarkerPath:
    """Counterfactual path that states the fact before the query, and records activation."""

    name = "marker-test"

    def __init__(self) -> None:
        self.active = 0

    def build_input(self, query: str, edits: Sequence[EditRequest], tokenizer: object) -> str:
        facts = " ".join(e.fact + "." for e in edits)
        return f"{facts}\n{query}"

    def build_chat_input(
        self, messages: Sequence[dict[str, str]], edits: Sequence[EditRequest], tokenizer: object
    ) -> str:
        return self.build_input(messages[-1]["content"], edits, tokenizer)

    @contextmanager
    def activate(self, model: object) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    wrapped = EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=5),
        model_name="tiny",
    )
    yield wrapped
    wrapped.close()


REQ = EditRequest(
    prompt="The place of death of Leo Arons is", target_new="Berlin", subject="Leo Arons"
)


def test_out_of_scope_is_untouched(em: EditableModel) -> None:
    em.edit(REQ)
    query = "The capital of France is"
    answer = em.generate(query)
    assert not answer.decision.in_scope
    assert answer.prompt == query
    assert em.model is not None and em.tokenizer is not None
    assert answer.text == greedy_generate(em.model, em.tokenizer, query, max_new_tokens=5)


def test_in_scope_uses_the_edit_and_rollback_removes_it(em: EditableModel) -> None:
    [rec] = em.edit(REQ)
    answer = em.generate("Where did Leo Arons die?")
    assert answer.decision.in_scope
    assert answer.decision.used_edit_ids == (rec.id,)
    assert REQ.fact in answer.prompt
    assert answer.decision.to_dict()["candidates"][0]["scope"] == 1.0
    em.rollback(rec.id)
    after = em.generate("Where did Leo Arons die?")
    assert not after.decision.in_scope
    assert after.prompt == "Where did Leo Arons die?"
    assert len(em.memory) == 0


def test_teacher_forced_scoring_routes_each_prompt(em: EditableModel) -> None:
    em.edit(REQ)
    cf = em.counterfactual
    assert isinstance(cf, MarkerPath)
    scores = em.teacher_forced(["Where did Leo Arons die?", "The sky is"], ["Berlin", "blue"])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert cf.active == 0  # activation contexts closed


def test_bad_input_writes_nothing(em: EditableModel) -> None:
    with pytest.raises(InvalidRequestError) as info:
        em.edit([REQ.to_dict(), {"prompt": "Who?", "target_new": ""}])
    assert info.value.field == "target_new"
    assert "requests[1]" in str(info.value)
    assert len(em.memory) == 0
    with pytest.raises(InvalidRequestError):
        em.edit([])
    with pytest.raises(InvalidRequestError, match="unknown adapter method"):
        em.edit(REQ, strategy="adapter", method="nonsense")
    assert em.edits() == []
    with pytest.raises(UnsupportedStrategyError, match="nonsense"):
        em.edit(REQ, strategy="nonsense")
    with pytest.raises(InvalidRequestError, match="query"):
        em.generate("   ")
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]\.role"):
        em.chat([{"role": "robot", "content": "hi"}])
    assert len(em.memory) == 0


def test_black_box_chat_gets_facts_only_in_scope(tmp_path: Path) -> None:
    seen: list[list[dict[str, str]]] = []

    def chat_fn(messages: list[dict[str, str]]) -> str:
        seen.append(messages)
        return "ok"

    mem = EditMemory.open(tmp_path / "bb", embedder=HashingEmbedder())
    with EditableModel(memory=mem, scope=OverlapScope(), chat_fn=chat_fn) as bb:
        bb.edit(REQ)
        bb.chat([{"role": "user", "content": "What is 2+2?"}])
        assert seen[-1] == [{"role": "user", "content": "What is 2+2?"}]
        answer = bb.chat([{"role": "user", "content": "Where did Leo Arons die?"}])
        assert answer.decision.in_scope
        assert seen[-1][0]["role"] == "system" and "Berlin" in seen[-1][0]["content"]
        with pytest.raises(UnsupportedStrategyError):
            bb.edit(REQ, strategy="weights")
        with pytest.raises(UnsupportedStrategyError):
            bb.teacher_forced(["q"], ["a"])


def test_wrapper_does_not_change_weights(em: EditableModel) -> None:
    assert em.model is not None
    before = {k: v.clone() for k, v in em.model.state_dict().items()}
    em.edit(REQ)
    em.generate("Where did Leo Arons die?")
    for k, v in em.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_and_reopen_bundle(em: EditableModel, tmp_path: Path) -> None:
    [rec] = em.edit(REQ)
    bundle = em.save_pretrained(tmp_path / "bundle")
    assert (bundle / "memedit.json").is_file()
    mem = EditMemory.open(bundle / "memory", embedder=HashingEmbedder())
    try:
        assert [r.id for r in mem.list()] == [rec.id]
        assert mem.search("Where did Leo Arons die?", k=1)[0].record.id == rec.id
    finally:
        mem.close()


def test_router_config_is_validated() -> None:
    with pytest.raises(InvalidRequestError, match="k"):
        RouterConfig(k=0)
    with pytest.raises(InvalidRequestError, match="threshold"):
        RouterConfig(threshold=1.5)
