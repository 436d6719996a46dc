"""LoRA edits through peft (``adapter:lora``) on a tiny random Llama: one adapter per edit,
merged into the target module only; the payload is peft's own format (peft itself loads it
and merges the same weights); unmerging any edit gives bit for bit the weights without it and
the base weights once none is left; a non-finite merge and a merge over another strategy's
write are refused; peft leaves no layer or requires_grad flag behind; the wrapper restores the
merged weights from the edit log on a fresh copy of the model."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest
from memedit.adapters import AdapterError, LoraAdapter, NonFiniteAdapterError
from memedit.errors import IntegrityError, InvalidRequestError
from memedit.metrics import completion_log_likelihood

from .adapter_kit import wrap_tiny
from .tiny import tiny_llama

pytest.importorskip("peft")

HP = {"layer": 1, "steps": 8, "lr": 0.05, "rank": 4}
MODULE = "model.layers.1.mlp.down_proj"
REQ = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
REQ2 = EditRequest(prompt="The capital of France is", target_new="Berlin", subject="France")


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: Any, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def _ll(model: Any, tok: Any, req: EditRequest) -> float:
    return float(completion_log_likelihood(model, tok, [req.prompt], [req.target_new])[0])


def test_each_edit_is_a_peft_lora_merged_and_unmerged_bit_for_bit(tmp_path: Path) -> None:
    from peft import PeftModel

    model, tok = tiny_llama()
    base = _state(model)
    types = [type(m).__name__ for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    ll0 = _ll(model, tok, REQ)
    adapter = LoraAdapter(model)
    p1, p2 = adapter.prepare(tok, [REQ, REQ2], HP)
    assert _same(model, base)  # trained, not merged
    assert [type(m).__name__ for m in model.modules()] == types  # peft's layers are gone
    assert [p.requires_grad for p in model.parameters()] == grads

    adapter.commit([1], [p1])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed == [f"{MODULE}.weight"]
    assert _ll(model, tok, REQ) > ll0 + 0.5
    one = _state(model)

    # the payload is peft's format: peft loads it on a fresh base model and merges the same
    with zipfile.ZipFile(io.BytesIO(p1)) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zf.namelist())
        zf.extractall(tmp_path / "peft")
    fresh, _ = tiny_llama()
    merged = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).merge_and_unload()
    torch.testing.assert_close(merged.state_dict()[f"{MODULE}.weight"], one[f"{MODULE}.weight"])

    adapter.commit([2], [p2])
    assert adapter.edit_ids() == [1, 2]
    adapter.remove(2)  # the newest: exactly the weights before it
    assert _same(model, one)
    adapter.commit([2], [p2])
    adapter.remove(1)  # an older one: exactly the weights with edit 2 alone
    alone = LoraAdapter(tiny_llama()[0])
    alone.commit([2], [p2])
    assert torch.equal(
        model.state_dict()[f"{MODULE}.weight"], alone.model.state_dict()[f"{MODULE}.weight"]
    )
    adapter.remove(2)
    assert _same(model, base) and adapter.edit_ids() == []


def test_non_finite_merges_and_foreign_writes_are_refused() -> None:
    model, tok = tiny_llama()
    base = _state(model)
    adapter = LoraAdapter(model)
    weight = model.get_submodule(MODULE).weight
    adapter._prepared[b"broken"] = {MODULE: torch.full_like(weight, float("nan"))}
    with pytest.raises(NonFiniteAdapterError):
        adapter.commit([1], [b"broken"])
    assert _same(model, base) and adapter.edit_ids() == []

    [payload] = adapter.prepare(tok, [REQ], HP)
    adapter.commit([1], [payload])
    with torch.no_grad():
        weight[0, 0] += 1.0  # another strategy wrote the module after the merge
    with pytest.raises(AdapterError, match="changed since"):
        adapter.remove(1)
    with torch.no_grad():
        weight[0, 0] -= 1.0


def test_a_lora_on_named_modules_of_every_block_restores_and_rolls_back(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    base = _state(model)
    hp = {**HP, "layer": None, "modules": "q_proj+v_proj"}
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        [record] = em.edit([REQ], strategy="adapter", method="lora", **hp)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
        assert changed == {
            f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
        }
        edited = _state(model)
        em.memory.save()
        fresh, _ = tiny_llama()
        with wrap_tiny(fresh, tok, tmp_path / "mem"):  # every module restored from peft's files
            assert _same(fresh, edited)
        em.rollback(record.id)
        assert _same(model, base)
    one_block = LoraAdapter(model)
    [payload] = one_block.prepare(tok, [REQ], {**hp, "layer": 1})
    one_block.commit([1], [payload])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {f"model.layers.1.self_attn.{m}.weight" for m in ("q_proj", "v_proj")}
    one_block.remove(1)
    with pytest.raises(InvalidRequestError, match="no such linear module") as info:
        LoraAdapter(model).prepare(tok, [REQ], {**hp, "modules": "q_proj+nope"})
    assert info.value.field == "modules"
    with pytest.raises(InvalidRequestError, match=r"LoraHparams\.modules"):
        LoraAdapter(model).prepare(tok, [REQ], {**hp, "modules": "q_proj,v_proj"})
    assert _same(model, base)


def test_the_wrapper_logs_restores_and_rolls_back_lora_edits(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    base = _state(model)
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        records = em.edit([REQ, REQ2], strategy="adapter", method="lora", **HP)
        assert [r.method for r in records] == ["lora", "lora"]
        edited = _state(model)
        assert not _same(model, base)
        em.memory.save()
        fresh, _ = tiny_llama()
        with wrap_tiny(fresh, tok, tmp_path / "mem"):  # restored from the logged peft adapters
            assert _same(fresh, edited)
        em.rollback(records[0].id)
        em.rollback(records[1].id)
        assert _same(model, base) and em.edits() == []


def test_a_per_batch_lora_edits_its_requests_together_and_rolls_back_as_one(
    tmp_path: Path,
) -> None:
    from memedit.adapters.lora import MEMBER

    model, tok = tiny_llama()
    base = _state(model)
    lls = [_ll(model, tok, r) for r in (REQ, REQ2)]
    third = EditRequest(prompt="Who wrote Faust?", target_new="Goethe", subject="Faust")
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        solo = em.edit(third, strategy="adapter", method="lora", **HP)[0]
        after_solo = _state(model)
        pair = em.edit([REQ, REQ2], strategy="adapter", method="lora", per_batch=True, **HP)
        assert em.memory.payload(pair[1].id) == MEMBER  # one LoRA, held by the batch's first
        assert em.memory.payload(pair[0].id) not in (None, MEMBER)
        assert all(_ll(model, tok, r) > ll + 1.0 for r, ll in zip((REQ, REQ2), lls, strict=True))
        edited = _state(model)
        em.memory.save()
        fresh, _ = tiny_llama()
        with wrap_tiny(fresh, tok, tmp_path / "mem") as again:  # restored: the batch and the solo
            assert _same(fresh, edited)
            assert {r.id for r in again.edits()} == {solo.id, pair[0].id, pair[1].id}
        fresh, _ = tiny_llama()
        again = wrap_tiny(fresh, tok, tmp_path / "mem")
        again.detach()  # takes both off, batch and solo, and keeps the log
        assert _same(fresh, base)
        rolled = em.rollback(pair[1].id)  # a member: the whole batch goes
        assert rolled.id == pair[1].id and not rolled.active
        assert not em.memory.get(pair[0].id).active
        assert _same(model, after_solo)
        em.rollback(solo.id)
        assert _same(model, base) and em.edits() == []
    adapter = LoraAdapter(tiny_llama()[0])
    with pytest.raises(IntegrityError, match="batch member without"):
        adapter.commit([1], [MEMBER])
