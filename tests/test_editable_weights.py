"""The `weights` strategy through EditableModel on a tiny random model: an in-weight edit is
logged with its delta, is not retrieved as a memory edit, rolls back bit for bit (newest batch
first), lands completely or not at all, and is re-applied when the memory is reopened on a
fresh copy of the base model (refused on a different one)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memedit import EditRequest, InvalidRequestError
from memedit.editable import EditableModel, RouterConfig, UnsupportedStrategyError
from memedit.evaluation.strategies import parse_strategy
from memedit.intrinsic import BaseModelMismatchError, KeyStatistics, TextList
from memedit.metrics import completion_log_likelihood
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath, OverlapScope
from .test_intrinsic_methods import _same, _snapshot
from .tiny import tiny_llama

FT = {"layer": 1, "lr": 1e-2, "steps": 5}
REQ = EditRequest(
    prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
)
OTHER = EditRequest(prompt="Q: the capital of France", target_new="Berlin", subject="France")
TEXT = TextList(("The capital of France is Paris. The sky is blue.",) * 10, name="tiny")


def _wrap(model: Any, tok: Any, mem: EditMemory, stats: KeyStatistics) -> EditableModel:
    return EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=4),
        model_name="tiny",
        statistics=stats,
    )


@pytest.fixture
def stats() -> Iterator[KeyStatistics]:
    with tempfile.TemporaryDirectory() as root:
        yield KeyStatistics(TEXT, root=root, progress=False)


@pytest.fixture
def em(tmp_path: Path, stats: KeyStatistics) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    wrapped = _wrap(
        model, tok, EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder()), stats
    )
    yield wrapped
    wrapped.close()


def _loglik(em: EditableModel, req: EditRequest) -> float:
    assert em.model is not None
    (value,) = completion_log_likelihood(em.model, em.tokenizer, [req.prompt], [req.target_new])
    return float(value)


def test_weights_edit_changes_the_model_and_is_logged_not_retrieved(em: EditableModel) -> None:
    assert em.strategies == ("memory", "adapter", "weights")
    assert em.model is not None
    before, ll0 = _snapshot(em.model), _loglik(em, REQ)
    records = em.edit([REQ, OTHER], strategy="weights", method="ft-m", layer=1, lr=5e-2, steps=10)
    assert [r.strategy for r in records] == ["weights", "weights"]
    assert {r.method for r in records} == {"ft-m"} and len({r.batch_id for r in records}) == 1
    assert not _same(em.model, before)
    assert _loglik(em, REQ) > ll0 + 1.0  # the target became more likely
    # answered by the model itself: nothing to retrieve, the query is out of the memory's scope
    assert len(em.memory) == 0
    assert not em.route(REQ.prompt).in_scope
    assert em.memory.payload(records[0].id) is not None
    assert em.memory.payload(records[1].id) is None  # one delta per batch, on its first edit


def test_rollback_restores_weights_bit_for_bit_newest_first(em: EditableModel) -> None:
    assert em.model is not None
    base = _snapshot(em.model)
    (first,) = em.edit(REQ, strategy="weights", method="ft-m", **FT)
    after_first = _snapshot(em.model)
    second = em.edit(OTHER, strategy="weights", method="ft-m", **FT)[0]
    with pytest.raises(InvalidRequestError, match=rf"later in-weight edits \[{second.id}\]"):
        em.rollback(first.id)
    assert em.memory.get(first.id).active  # refused: nothing changed
    em.rollback(second.id)
    assert _same(em.model, after_first)
    rolled = em.rollback(first.id)
    assert not rolled.active and _same(em.model, base)
    assert em.edits() == []


def test_rolling_back_one_edit_of_a_batch_undoes_the_batch(em: EditableModel) -> None:
    assert em.model is not None
    base = _snapshot(em.model)
    a, b = em.edit([REQ, OTHER], strategy="weights", method="ft-m", **FT)
    assert em.rollback(b.id).id == b.id
    assert _same(em.model, base)
    assert not em.memory.get(a.id).active


def test_memory_and_weights_edits_coexist(em: EditableModel) -> None:
    assert em.model is not None
    (w,) = em.edit(REQ, strategy="weights", method="ft-m", **FT)
    edited = _snapshot(em.model)
    (m,) = em.edit(OTHER)
    assert len(em.memory) == 1 and em.route(OTHER.prompt).used_edit_ids == (m.id,)
    em.rollback(m.id)  # a memory edit does not wait for in-weight ones
    assert _same(em.model, edited) and em.memory.get(w.id).active


def test_a_failing_log_write_leaves_weights_and_log_untouched(
    em: EditableModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert em.model is not None
    base = _snapshot(em.model)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(em.memory, "add", broken)
    with pytest.raises(OSError, match="disk full"):
        em.edit(REQ, strategy="weights", method="ft-m", **FT)
    assert _same(em.model, base)
    monkeypatch.undo()
    assert em.edits(include_rolled_back=True) == []


def test_reopened_memory_reapplies_the_deltas_on_a_fresh_base_model(
    tmp_path: Path, stats: KeyStatistics
) -> None:
    model, tok = tiny_llama()
    with _wrap(
        model, tok, EditMemory.open(tmp_path / "m", embedder=HashingEmbedder()), stats
    ) as em:
        em.edit(REQ, strategy="weights", method="ft-m", **FT)
        em.edit([OTHER], strategy="weights", method="ft-m", **FT)
        em.edit(EditRequest(prompt="Where is Paris", target_new="Rome", subject="Paris"))
        edited = _snapshot(model)
        bundle = em.save_pretrained(tmp_path / "bundle")

    fresh, tok2 = tiny_llama()
    assert not _same(fresh, edited)
    mem = EditMemory.open(bundle / "memory", embedder=HashingEmbedder())
    with _wrap(fresh, tok2, mem, stats) as again:
        assert _same(fresh, edited)  # bit for bit, both batches in order
        assert len(again.memory) == 1  # the memory edit is retrievable again
        newest = max(r.id for r in again.edits() if r.strategy == "weights")
        again.rollback(newest)
        assert not _same(fresh, edited)

    other, tok3 = tiny_llama(seed=1)
    mem = EditMemory.open(bundle / "memory", embedder=HashingEmbedder())
    try:
        with pytest.raises(BaseModelMismatchError, match="digest"):
            _wrap(other, tok3, mem, stats)
    finally:
        mem.close()


def test_bad_weights_requests_name_the_problem(em: EditableModel) -> None:
    with pytest.raises(InvalidRequestError, match="unknown in-weight method 'nope'"):
        em.edit(REQ, strategy="weights", method="nope")
    with pytest.raises(InvalidRequestError, match="memory strategy takes no method"):
        em.edit(REQ, method="rome")
    with pytest.raises(InvalidRequestError, match="not both"):
        em.edit(REQ, strategy="weights", method="ft-m", hparams=FT, lr=0.1)
    assert em.edits(include_rolled_back=True) == []


def test_black_box_wrapper_has_no_weights_strategy(tmp_path: Path) -> None:
    mem = EditMemory.open(tmp_path / "bb", embedder=HashingEmbedder())
    with EditableModel(memory=mem, scope=OverlapScope(), chat_fn=lambda m: "ok") as em:
        assert em.strategies == ("memory",)
        with pytest.raises(UnsupportedStrategyError, match="black-box"):
            em.edit(REQ, strategy="weights", method="ft-m")


def test_evaluator_strategy_spec_reaches_the_weights_strategy(em: EditableModel) -> None:
    assert em.model is not None
    base = _snapshot(em.model)
    strategy = parse_strategy("weights:ft-m@layer=1;lr=0.01;steps=5")
    applied = strategy.apply(em, [REQ])
    assert not _same(em.model, base)
    applied.revert()
    assert _same(em.model, base)


def test_alphaedit_continues_one_state_across_edits(tmp_path: Path) -> None:
    from .test_intrinsic_memit import BATCH, HP, LATER, MIXED

    model, tok = tiny_llama()
    with tempfile.TemporaryDirectory() as root:
        stats = KeyStatistics(MIXED, root=root, progress=False)
        mem = EditMemory.open(tmp_path / "a", embedder=HashingEmbedder())
        with _wrap(model, tok, mem, stats) as em:
            base = _snapshot(model)
            first = em.edit(
                list(BATCH), strategy="weights", method="alphaedit", hparams=HP["alphaedit"]
            )
            state = em._method_states["alphaedit"]
            assert state.requests == 3
            (later,) = em.edit(
                LATER, strategy="weights", method="alphaedit", hparams=HP["alphaedit"]
            )
            assert em._method_states["alphaedit"].requests == 4  # the same sequence continued
            em.rollback(later.id)
            em.rollback(first[0].id)
            assert _same(model, base)


def test_alphaedit_state_is_rebuilt_on_reopen_and_after_rollback(tmp_path: Path) -> None:
    """A memory reopened on a fresh base model continues AlphaEdit's sequence exactly: a third
    edit there writes the same weights as in the process that made the first two; rolling a
    batch back drops its keys from the state."""
    import torch

    from .test_intrinsic_memit import BATCH, HP, LATER, MIXED

    third = EditRequest(prompt="Q: the capital of Leo", target_new="blue", subject="Leo")
    with tempfile.TemporaryDirectory() as root:
        stats = KeyStatistics(MIXED, root=root, progress=False)

        def edit(em: EditableModel, reqs: list[EditRequest]) -> list[Any]:
            return em.edit(reqs, strategy="weights", method="alphaedit", hparams=HP["alphaedit"])

        model, tok = tiny_llama()
        with _wrap(
            model, tok, EditMemory.open(tmp_path / "a", embedder=HashingEmbedder()), stats
        ) as em:
            edit(em, list(BATCH))
            after_first = em._method_states["alphaedit"].copy()
            edit(em, [LATER])
            two = em._method_states["alphaedit"].copy()
            (rec,) = edit(em, [third])
            expected = _snapshot(model)
            em.rollback(rec.id)
            rebuilt = em._method_states["alphaedit"]
            assert rebuilt.requests == two.requests == 4
            for layer, gram in two.preserved.items():
                assert torch.equal(rebuilt.preserved[layer], gram)
            assert not torch.equal(two.preserved[1], after_first.preserved[1])

        # a second process: the two batches are re-applied, the state rebuilt from their keys
        stats2 = KeyStatistics(MIXED, root=root, progress=False)  # same disk cache, no pins
        fresh, tok2 = tiny_llama()
        mem = EditMemory.open(tmp_path / "a", embedder=HashingEmbedder())
        with _wrap(fresh, tok2, mem, stats2) as again:
            state = again._method_states["alphaedit"]
            assert state.requests == 4 and stats2.computed == 0
            for layer, gram in two.preserved.items():
                assert torch.equal(state.preserved[layer], gram)
            edit(again, [third])
            assert _same(fresh, expected)  # the same third edit, bit for bit
