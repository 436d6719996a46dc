"""GRACE (memedit.adapters) on tiny random models: the codebook's lookup and radius upkeep
(add, expand, split, rebuild on rollback), training every edit of a batch until the target is
predicted, out-of-scope inputs running bit for bit as unedited, rollback restoring outputs bit
for bit, the state's round trip through the edit log (a reopened memory answers the same), the
NaN/Inf guard, and no hook left behind. Through EditableModel as ``adapter:grace`` and through
the evaluator's strategy parser with no evaluator change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.adapters import (
    Codebook,
    GraceAdapter,
    Item,
    NonFiniteAdapterError,
    adapter_names,
    get_adapter,
)
from memedit.adapters.codebook import item_from_bytes, item_to_bytes
from memedit.editable import EditableModel, UnsupportedStrategyError
from memedit.errors import IntegrityError
from memedit.evaluation.strategies import parse_strategy
from memedit.metrics import teacher_forced_accuracy
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .adapter_kit import hook_count, logits, wrap_tiny
from .test_editable import OverlapScope
from .tiny import tiny_llama

HP = {"layer": 1, "steps": 10, "lr": 1.0, "stop_prob": 0.5}
REQ = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
REQ2 = EditRequest(prompt="The capital of France is", target_new="Berlin", subject="France")
UNRELATED = "The sky is blue. What is the name of the spouse"


def _item(key: list[float], label: str, eps: float = 1.0, value: float = 9.0) -> Item:
    k = torch.tensor(key, dtype=torch.float32)
    return Item(key=k, value=torch.full_like(k, value), label=label, eps_init=eps, module="m")


# ---------------------------------------------------------------------------- codebook


def test_far_keys_get_their_own_entries_and_lookup_respects_the_radius() -> None:
    book = Codebook()
    book.add(1, _item([0.0, 0.0], "a"))
    book.add(2, _item([10.0, 0.0], "b", value=7.0))
    assert len(book) == 2 and book.radii == [1.0, 1.0] and book.owners == [1, 2]
    hidden = torch.tensor([[[0.5, 0.0], [10.0, 0.9], [5.0, 5.0]]])
    hit, idx = book.lookup(hidden)
    assert hit.tolist() == [[True, True, False]] and idx[0, :2].tolist() == [0, 1]
    out = book.apply(hidden)
    assert out[0, 0].tolist() == [9.0, 9.0] and out[0, 1].tolist() == [7.0, 7.0]
    assert torch.equal(out[0, 2], hidden[0, 2])
    miss = torch.tensor([[[5.0, 5.0]]])
    assert book.apply(miss) is miss  # nothing in range: the very same tensor comes back


def test_same_label_nearby_expands_and_another_label_splits() -> None:
    book = Codebook()
    book.add(1, _item([0.0, 0.0], "a"))
    book.add(2, _item([1.5, 0.0], "a"))  # within eps + eps_init, same label: expand
    assert book.radii == [1.5, 1.0] and book.owners == [1, 2]  # and an entry of its own
    book.add(3, _item([0.0, 2.0], "b"))  # within reach of entry 1, another label: split at d/2
    assert book.radii == [1.0, 1.0, 1.0] and book.labels == ["a", "a", "b"]
    hit, idx = book.lookup(torch.tensor([[0.0, 0.9], [0.0, 1.1]]))
    assert hit.tolist() == [True, True] and idx.tolist() == [0, 2]


def test_every_edit_answers_its_own_key_with_its_own_value_after_expands_and_splits() -> None:
    book = Codebook()
    book.add(1, _item([0.0, 0.0], "human", value=1.0))
    book.add(2, _item([1.8, 0.0], "human", value=2.0))  # expands entry 1 to radius 1.8
    book.add(3, _item([-1.0, 0.0], "male", value=3.0))  # splits entry 1 down to 0.5
    assert book.owners == [1, 2, 3] and book.radii == [0.5, 1.0, 0.5]
    out = book.apply(torch.tensor([[[1.8, 0.0], [0.0, 0.0], [-1.0, 0.0]]]))
    assert out[0, :, 0].tolist() == [2.0, 1.0, 3.0]  # the paper's expansion would answer 2 with 1


def test_rollback_rebuilds_as_if_the_edit_had_never_been_made() -> None:
    book = Codebook()
    book.add(1, _item([0.0, 0.0], "a"))
    before = (book.keys.clone(), book.values.clone(), list(book.radii))  # type: ignore[union-attr]
    book.add(2, _item([0.0, 2.0], "b"))
    assert book.radii == [1.0, 1.0]
    book.remove(2)  # the newest: bit for bit the codebook before it
    assert torch.equal(book.keys, before[0]) and torch.equal(book.values, before[1])  # type: ignore[arg-type]
    assert book.radii == before[2]
    book.add(2, _item([0.0, 2.0], "b"))
    book.add(3, _item([20.0, 0.0], "c"))
    book.remove(1)  # an older one: the rest replayed without it
    assert book.owners == [2, 3] and book.radii == [1.0, 1.0]
    book.add(1, _item([0.0, 0.0], "a"))  # re-inserted out of order: replayed in id order
    assert book.owners == [1, 2, 3] and book.radii == [1.0, 1.0, 1.0]


def test_items_round_trip_and_refuse_non_finite_or_corrupt_state() -> None:
    item = _item([1.0, 2.0], "Paris", eps=0.5)
    back = item_from_bytes(item_to_bytes(item))
    assert torch.equal(back.key, item.key) and torch.equal(back.value, item.value)
    assert (back.label, back.eps_init, back.module) == ("Paris", 0.5, "m")
    with pytest.raises(NonFiniteAdapterError):
        _item([1.0, float("nan")], "x")
    with pytest.raises(NonFiniteAdapterError):
        Item(torch.zeros(2), torch.tensor([0.0, float("inf")]), "x", 1.0, "m")
    with pytest.raises(IntegrityError):
        item_from_bytes(b"not an item")
    with pytest.raises(IntegrityError):
        item_from_bytes(item_to_bytes(item)[:-10])


# ---------------------------------------------------------------------------- adapter


def test_every_edit_of_a_batch_is_learned_and_only_inside_the_radius(tiny: Any) -> None:
    model, tok = tiny
    adapter = GraceAdapter(model)
    base_edit, base_other = logits(model, tok, REQ.prompt), logits(model, tok, UNRELATED)
    acc0 = teacher_forced_accuracy(model, tok, [REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
    payloads = adapter.prepare(tok, [REQ, REQ2], HP)
    assert len(payloads) == 2 and adapter.edit_ids() == []  # trained, not yet active
    assert torch.equal(logits(model, tok, REQ.prompt), base_edit)
    adapter.commit([1, 2], payloads)
    assert adapter.edit_ids() == [1, 2] and len(adapter.codebooks["model.layers.1"]) == 2
    with adapter.active():
        acc = teacher_forced_accuracy(model, tok, [REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
        other = logits(model, tok, UNRELATED)
    assert acc == [1.0, 1.0] and acc0 != [1.0, 1.0]
    assert torch.equal(other, base_other)  # out of every radius: bit for bit unedited
    assert hook_count(model) == 0
    adapter.remove(2)
    adapter.remove(1)
    with adapter.active():
        assert torch.equal(logits(model, tok, REQ.prompt), base_edit)
    assert adapter.codebooks == {}


def test_hooks_are_removed_when_the_body_raises(tiny: Any) -> None:
    model, tok = tiny
    adapter = GraceAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], HP))
    with pytest.raises(RuntimeError, match="boom"), adapter.active():
        assert hook_count(model) == 1
        raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_a_diverging_value_is_refused(tiny: Any) -> None:
    model, tok = tiny
    adapter = GraceAdapter(model)
    head = model.lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[0] = float("nan")
        with pytest.raises(NonFiniteAdapterError):
            adapter.prepare(tok, [REQ], HP)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert adapter.edit_ids() == [] and hook_count(model) == 0


def test_hparams_are_validated(tiny: Any) -> None:
    model, tok = tiny
    adapter = GraceAdapter(model)
    with pytest.raises(InvalidRequestError, match="radius"):
        adapter.prepare(tok, [REQ], {"radius": -1.0})
    with pytest.raises(InvalidRequestError, match="layer"):
        adapter.prepare(tok, [REQ], {"layer": 7})
    with pytest.raises(InvalidRequestError, match="unknown"):
        adapter.prepare(tok, [REQ], {"nonsense": 1})
    assert "grace" in adapter_names() and get_adapter("grace") is GraceAdapter


# ---------------------------------------------------------------------------- wrapper


@pytest.fixture
def em(tiny: Any, tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny
    wrapped = wrap_tiny(model, tok, tmp_path / "mem")
    yield wrapped
    wrapped.close()


def test_adapter_strategy_edits_persists_and_rolls_back_one_by_one(
    em: EditableModel, tiny: Any, tmp_path: Path
) -> None:
    model, tok = tiny
    assert "adapter" in em.strategies
    query = "What is the name of Leo Arons"  # the same prompt tail, out of the radius
    base = em.teacher_forced([REQ.prompt, REQ2.prompt, query], ["Paris", "Berlin", "Paris"])
    records = em.edit([REQ, REQ2], strategy="adapter", method="grace", **HP)
    assert [r.strategy for r in records] == ["adapter", "adapter"]
    assert {r.method for r in records} == {"grace"} and len(em.memory) == 0  # not retrieved
    after = em.teacher_forced([REQ.prompt, REQ2.prompt, query], ["Paris", "Berlin", "Paris"])
    assert after[:2] == [1.0, 1.0] and after[2] == base[2]
    assert hook_count(model) == 0  # active only while the wrapper runs the model
    with em.adapted():
        edited = logits(model, tok, REQ.prompt)

    # the state is in the log: a reopened memory on a fresh copy of the model answers the same
    em.memory.save()
    fresh, _ = tiny_llama()
    with wrap_tiny(fresh, tok, tmp_path / "mem") as again:
        assert again.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]) == [1.0, 1.0]
        with again.adapted():
            assert torch.equal(logits(fresh, tok, REQ.prompt), edited)
        bundle = again.save_pretrained(tmp_path / "bundle")
    assert '"adapter_edits": 2' in (bundle / "memedit.json").read_text()

    em.rollback(records[0].id)  # one edit of the batch, the other stays
    now = em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
    assert now[1] == 1.0 and now[0] == base[0]
    em.rollback(records[1].id)
    assert em.edits() == []
    with em.adapted():
        assert hook_count(model) == 0  # no edit left: nothing hooked
    assert em.teacher_forced([REQ.prompt], ["Paris"]) == base[:1]


def test_a_refused_adapter_edit_writes_nothing(em: EditableModel, tiny: Any) -> None:
    model, _ = tiny
    head = model.lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[0] = float("inf")
        with pytest.raises(NonFiniteAdapterError):
            em.edit(REQ, strategy="adapter", **HP)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert em.edits(include_rolled_back=True) == []


def test_a_black_box_cannot_open_a_memory_with_adapter_edits(
    em: EditableModel, tmp_path: Path
) -> None:
    em.edit(REQ, strategy="adapter", **HP)
    em.memory.save()
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    with pytest.raises(UnsupportedStrategyError, match="adapter edit"):
        EditableModel(memory=mem, scope=OverlapScope(), chat_fn=lambda m: "x")
    mem.close()


def test_the_evaluator_runs_adapter_grace_without_a_change(em: EditableModel, tiny: Any) -> None:
    model, tok = tiny
    strategy = parse_strategy("adapter:grace@layer=1;steps=10;lr=1.0;stop_prob=0.5")
    assert strategy.name == "adapter:grace"
    before = logits(model, tok, REQ.prompt)
    applied = strategy.apply(em, [REQ, REQ2])
    assert em.teacher_forced([REQ.prompt], ["Paris"]) == [1.0]
    applied.revert()
    assert em.edits() == []
    with em.adapted():
        assert torch.equal(logits(model, tok, REQ.prompt), before)
