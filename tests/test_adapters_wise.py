"""WISE (memedit.adapters) on tiny random models: the routing rule (tokens scoring above the
threshold answered by the side memory, the rest, and an out-of-scope input as a whole, bit for
bit by the main memory), TIES merging of the shards, rollback recomputing the state exactly,
the payload's round trip through the edit log (a reopened memory answers the same), the NaN/Inf
guard, a batch learning every edit, the sliced forward used in training, and no hook left
behind. Through EditableModel as ``adapter:wise`` and the evaluator's strategy parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.adapters import NonFiniteAdapterError, WiseAdapter, adapter_names, get_adapter
from memedit.adapters.side_memory import (
    SideMemory,
    WiseItem,
    WiseLayout,
    item_from_bytes,
    item_to_bytes,
    ties,
)
from memedit.editable import EditableModel
from memedit.errors import IntegrityError
from memedit.evaluation.strategies import parse_strategy
from memedit.metrics import teacher_forced_accuracy

from .adapter_kit import hook_count, logits, wrap_tiny
from .tiny import tiny_llama

# the paper's rule: activation router, no protections, one group (the key router has its own
# tests in test_adapters_wise_keys.py)
HP = {
    "layer": 1,
    "steps": 150,
    "lr": 0.05,
    "margin_weight": 0.1,
    "router": "activation",
    "irrelevant_size": 0,
    "generic_weight": 0.0,
    "edit_weight": 0.0,
    "group_size": 0,
}
REQ = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
REQ2 = EditRequest(prompt="The capital of France is", target_new="Berlin", subject="France")
LAYOUT = WiseLayout("m", (2, 3), shards=2, mask_ratio=0.5, seed=0, density=1.0, act_ratio=0.5)


def _item(shard: int, value: float, acts: list[list[float]]) -> WiseItem:
    delta = torch.full((LAYOUT.nnz(),), value, dtype=torch.float16)
    a = torch.tensor(acts, dtype=torch.float32)
    return WiseItem(LAYOUT, shard, delta, a, "x", LAYOUT.mask_digest(shard))


# ---------------------------------------------------------------------------- side memory


def test_ties_elects_signs_and_averages_the_agreeing_entries() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert ties([a, b], 1.0).tolist() == [2.0, -2.0, 0.0, 3.0]
    assert ties([a], 0.5).tolist() == [0.0, -2.0, 0.0, 3.0]  # trimmed to the 2 largest
    assert ties([a], 1.0).tolist() == a.tolist()


def test_routing_sends_only_tokens_above_the_threshold_to_the_side_memory() -> None:
    mem = SideMemory(LAYOUT)
    mem.add_many([(1, _item(0, 1.0, [[1.0, 1.0, 1.0]]))])
    assert mem.delta is not None and mem.threshold > 0
    acts = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1e-4, 0.0, 0.0]]])
    out = torch.zeros(1, 3, 2)
    routed = mem.apply(acts, out)
    assert (routed[0, 0] != 0).any()  # the edit's own activation: side memory
    assert torch.equal(routed[0, 1:], out[0, 1:])  # the others: main memory, untouched
    quiet = torch.zeros(1, 2, 3)
    assert mem.apply(quiet, out[:, :2]) is not None
    assert mem.apply(quiet, out[:, :2]).data_ptr() == out.data_ptr()  # the very same tensor


def test_rollback_recomputes_the_state_as_if_the_edit_had_never_been_made() -> None:
    mem = SideMemory(LAYOUT)
    mem.add_many([(1, _item(0, 1.0, [[1.0, 0.0, 0.0]])), (2, _item(1, -0.5, [[0.0, 1.0, 0.0]]))])
    assert mem.delta is not None
    before = (mem.delta.clone(), mem.threshold, {s: d.clone() for s, d in mem.shard_deltas.items()})
    mem.add_many([(3, _item(0, 2.0, [[0.0, 0.0, 1.0]]))])
    assert not torch.equal(mem.delta, before[0])
    mem.remove(3)  # the newest: bit for bit the state before it
    assert torch.equal(mem.delta, before[0]) and mem.threshold == before[1]
    assert all(torch.equal(mem.shard_deltas[s], d) for s, d in before[2].items())
    mem.remove(1)
    mem.add_many([(1, _item(0, 1.0, [[1.0, 0.0, 0.0]]))])  # re-inserted out of order
    assert torch.equal(mem.delta, before[0]) and mem.threshold == before[1]
    mem.remove(1)
    mem.remove(2)
    assert mem.delta is None and mem.apply(torch.ones(1, 1, 3), torch.zeros(1, 1, 2)).sum() == 0


def test_items_round_trip_and_refuse_non_finite_or_corrupt_state() -> None:
    item = _item(1, 0.25, [[1.0, 2.0, 3.0]])
    back = item_from_bytes(item_to_bytes(item))
    assert torch.equal(back.delta, item.delta) and torch.equal(back.acts, item.acts)
    assert (back.layout, back.shard, back.mask_digest) == (LAYOUT, 1, item.mask_digest)
    with pytest.raises(NonFiniteAdapterError):
        _item(0, float("nan"), [[1.0, 1.0, 1.0]])
    with pytest.raises(NonFiniteAdapterError):
        _item(0, 1.0, [[1.0, float("inf"), 1.0]])
    with pytest.raises(IntegrityError):
        item_from_bytes(b"not an item")
    with pytest.raises(IntegrityError):
        item_from_bytes(item_to_bytes(item)[:-10])
    mem = SideMemory(LAYOUT)
    other = WiseLayout("m", (2, 3), 2, 0.5, 1, 1.0, 0.5)  # another seed
    with pytest.raises(InvalidRequestError, match="settings"):
        mem.add_many([(1, WiseItem(other, 0, item.delta, item.acts, "x", other.mask_digest(0)))])
    assert len(mem) == 0


# ---------------------------------------------------------------------------- adapter


def test_the_sliced_training_forward_equals_the_full_one(tiny: Any) -> None:
    from memedit.adapters.wise import _upper
    from memedit.intrinsic.compute import forward_logits, target_batch

    model, tok = tiny
    batch = target_batch(tok, [(REQ.prompt, "Paris"), (REQ2.prompt, "Berlin")], torch.device("cpu"))
    full = forward_logits(model, batch.ids, batch.mask, batch.keep)
    blocks = model.model.layers
    with (
        torch.no_grad(),
        _upper(model, tok, "model.layers.1.mlp.down_proj", batch.ids, batch.mask) as run,
    ):
        assert len(model.model.layers) == 1  # only the block with the side memory runs
        sliced = run(batch.keep)
    assert model.model.layers is blocks
    assert torch.allclose(sliced, full, atol=1e-5)


def test_every_edit_of_a_batch_is_learned_routed_and_rolled_back_exactly(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    prompts, targets = [REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]
    base_edit = logits(model, tok, REQ.prompt)
    acc0 = teacher_forced_accuracy(model, tok, prompts, targets)
    payloads = adapter.prepare(tok, [REQ, REQ2], HP)
    assert len(payloads) == 2 and adapter.edit_ids() == []  # trained, not yet active
    assert torch.equal(logits(model, tok, REQ.prompt), base_edit)
    adapter.commit([1, 2], payloads)
    [memory] = adapter.memories.values()
    assert memory.layout.module == "model.layers.1.mlp.down_proj"
    assert {adapter.item(1).shard, adapter.item(2).shard} == {0, 1}  # round-robin shards
    with adapter.active():
        acc = teacher_forced_accuracy(model, tok, prompts, targets)
    assert acc == [1.0, 1.0] and acc0 != [1.0, 1.0]
    for i in (1, 2):  # every in-scope token of each edit scores above the threshold
        assert bool((memory.scores(adapter.item(i).acts) > memory.threshold).all())
    assert hook_count(model) == 0
    state = (memory.delta.clone(), memory.threshold)
    adapter.commit([3], adapter.prepare(tok, [REQ], HP))
    adapter.remove(3)
    assert torch.equal(memory.delta, state[0]) and memory.threshold == state[1]
    adapter.remove(2)
    adapter.remove(1)
    assert adapter.memories == {}
    with adapter.active():
        assert torch.equal(logits(model, tok, REQ.prompt), base_edit)
        assert hook_count(model) == 0


def test_hooks_are_removed_when_the_body_raises(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], {**HP, "steps": 2}))
    with pytest.raises(RuntimeError, match="boom"), adapter.active():
        assert hook_count(model) == 2  # the input and the output hook of the side memory's module
        raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_a_diverging_edit_is_refused_and_nothing_changes(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
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
    assert model.model.layers[0] is not None and len(model.model.layers) == 2


def test_hparams_are_validated(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    with pytest.raises(InvalidRequestError, match="mask_ratio"):
        adapter.prepare(tok, [REQ], {"mask_ratio": 0.0})
    with pytest.raises(InvalidRequestError, match="beta"):
        adapter.prepare(tok, [REQ], {"alpha": 1.0, "beta": 0.5})
    with pytest.raises(InvalidRequestError, match="layer"):
        adapter.prepare(tok, [REQ], {"layer": 7})
    with pytest.raises(InvalidRequestError, match="unknown"):
        adapter.prepare(tok, [REQ], {"nonsense": 1})
    assert "wise" in adapter_names() and get_adapter("wise") is WiseAdapter


# ---------------------------------------------------------------------------- wrapper


@pytest.fixture
def em(tiny: Any, tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny
    wrapped = wrap_tiny(model, tok, tmp_path / "mem")
    yield wrapped
    wrapped.close()


def test_adapter_strategy_edits_persists_and_rolls_back(
    em: EditableModel, tiny: Any, tmp_path: Path
) -> None:
    model, tok = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
    records = em.edit([REQ, REQ2], strategy="adapter", method="wise", **HP)
    assert [r.method for r in records] == ["wise", "wise"] and len(em.memory) == 0
    assert em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]) == [1.0, 1.0]
    assert hook_count(model) == 0  # active only while the wrapper runs the model
    with em.adapted():
        edited = logits(model, tok, REQ.prompt)

    em.memory.save()  # the side memory is in the log: a fresh model reopened answers the same
    fresh, _ = tiny_llama()
    with wrap_tiny(fresh, tok, tmp_path / "mem") as again:
        with again.adapted():
            assert torch.equal(logits(fresh, tok, REQ.prompt), edited)
        bundle = again.save_pretrained(tmp_path / "bundle")
    assert '"adapter_edits": 2' in (bundle / "memedit.json").read_text()

    em.rollback(records[1].id)
    em.rollback(records[0].id)
    assert em.edits() == []
    with em.adapted():
        assert hook_count(model) == 0
    assert em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]) == base
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_evaluator_runs_adapter_wise_without_a_change(em: EditableModel, tiny: Any) -> None:
    model, tok = tiny
    strategy = parse_strategy(
        "adapter:wise@layer=1;steps=150;lr=0.05;margin_weight=0.1;router_layer=0;"
        "router_threshold=0.9;stats_tokens=4000;protect_rank=4"
    )
    assert strategy.name == "adapter:wise"
    before = logits(model, tok, REQ.prompt)
    applied = strategy.apply(em, [REQ, REQ2])
    assert em.teacher_forced([REQ.prompt], ["Paris"]) == [1.0]
    applied.revert()
    assert em.edits() == []
    with em.adapted():
        assert torch.equal(logits(model, tok, REQ.prompt), before)
