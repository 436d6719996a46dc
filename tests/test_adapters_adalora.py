"""AdaLoRA edits through peft (``adapter:adalora``) on a tiny random Llama: one peft AdaLoRA per
edit, trained with peft's rank allocator (its ``rank_pattern`` prunes the triplets), merged into
the target module only; the payload is peft's own format (peft loads it on a fresh model and
merges the same weights); unmerging gives bit for bit the weights without the edit and the base
weights once none is left; a non-finite merge is refused; bad hyperparameters are refused
naming the field; the wrapper restores the merged weights from the edit log and rolls back."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.adapters import AdaLoraAdapter, AdaLoraHparams, NonFiniteAdapterError, get_adapter
from memedit.evaluation.strategies import parse_strategy
from memedit.metrics import completion_log_likelihood

from .adapter_kit import wrap_tiny
from .tiny import tiny_llama

pytest.importorskip("peft")

# stop_prob out of reach on a random model: every step runs, so the allocator prunes to rank 1
HP = {"layer": 1, "steps": 8, "lr": 0.1, "rank": 1, "init_r": 4, "stop_prob": 0.99}
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


def test_each_edit_is_a_peft_adalora_pruned_merged_and_unmerged_bit_for_bit(
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    model, tok = tiny_llama()
    base = _state(model)
    types = [type(m).__name__ for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    ll0 = _ll(model, tok, REQ)
    adapter = AdaLoraAdapter(model)
    p1, p2 = adapter.prepare(tok, [REQ, REQ2], HP)
    assert _same(model, base)  # trained, not merged
    assert [type(m).__name__ for m in model.modules()] == types  # peft's layers are gone
    assert [p.requires_grad for p in model.parameters()] == grads

    adapter.commit([1], [p1])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed == [f"{MODULE}.weight"]
    assert _ll(model, tok, REQ) > ll0 + 0.5
    one = _state(model)

    # peft's AdaLoRA format, its allocator's rank pattern kept: 1 of the 4 triplets alive
    with zipfile.ZipFile(io.BytesIO(p1)) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zf.namelist())
        config = json.loads(zf.read("adapter_config.json"))
        zf.extractall(tmp_path / "peft")
    assert config["peft_type"] == "ADALORA" and config["target_modules"] == [MODULE]
    [pattern] = config["rank_pattern"].values()
    assert len(pattern) == 4 and sum(pattern) == 1
    fresh, _ = tiny_llama()
    merged = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).merge_and_unload()
    torch.testing.assert_close(merged.state_dict()[f"{MODULE}.weight"], one[f"{MODULE}.weight"])

    adapter.commit([2], [p2])
    adapter.remove(2)  # the newest: exactly the weights before it
    assert _same(model, one)
    adapter.commit([2], [p2])
    adapter.remove(1)  # an older one: exactly the weights with edit 2 alone
    alone = AdaLoraAdapter(tiny_llama()[0])
    alone.commit([2], [p2])
    assert torch.equal(
        model.state_dict()[f"{MODULE}.weight"], alone.model.state_dict()[f"{MODULE}.weight"]
    )
    adapter.remove(2)
    assert _same(model, base) and adapter.edit_ids() == []


def test_a_non_finite_merge_is_refused_and_a_lora_payload_is_not_adalora() -> None:
    from memedit.adapters import LoraAdapter
    from memedit.errors import IntegrityError

    model, tok = tiny_llama()
    base = _state(model)
    adapter = AdaLoraAdapter(model)
    weight = model.get_submodule(MODULE).weight
    adapter._prepared[b"broken"] = {MODULE: torch.full_like(weight, float("nan"))}
    with pytest.raises(NonFiniteAdapterError, match="AdaLoRA"):
        adapter.commit([1], [b"broken"])
    assert _same(model, base) and adapter.edit_ids() == []
    [lora] = LoraAdapter(model).prepare(tok, [REQ], {"layer": 1, "steps": 2})
    with pytest.raises(IntegrityError, match="AdaLoRA payload metadata"):
        adapter.commit([1], [lora])
    assert _same(model, base)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"init_r": 1, "rank": 2}, "init_r"),
        ({"steps": 4, "tinit": 2, "tfinal": 2}, "steps"),
        ({"rank": 0}, "rank"),
        ({"beta1": 1.0}, "beta1"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
        ({"delta_t": 0}, "delta_t"),
        ({"init_r": 2, "rank": 2}, "init_r"),  # peft's allocator fails with nothing to prune
        ({"layer": 9}, "layer"),
    ],
)
def test_bad_hparams_are_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"AdaLoraHparams.{field}") as info:
        hp = AdaLoraHparams(**options)
        hp.modules_for(tiny_llama()[0])
    assert info.value.field == field


def test_the_wrapper_logs_restores_and_rolls_back_adalora_edits(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    base = _state(model)
    assert get_adapter("adalora") is AdaLoraAdapter
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        records = em.edit([REQ, REQ2], strategy="adapter", method="adalora", **HP)
        assert [r.method for r in records] == ["adalora", "adalora"]
        edited = _state(model)
        assert not _same(model, base)
        em.memory.save()
        fresh, _ = tiny_llama()
        with wrap_tiny(fresh, tok, tmp_path / "mem"):  # restored from the logged peft adapters
            assert _same(fresh, edited)
        em.rollback(records[0].id)
        em.rollback(records[1].id)
        assert _same(model, base) and em.edits() == []


def test_the_evaluator_runs_adapter_adalora_without_a_change(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    base = _state(model)
    strategy = parse_strategy("adapter:adalora@layer=1;steps=8;lr=0.05;rank=1;init_r=4")
    assert strategy.name == "adapter:adalora"
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        applied = strategy.apply(em, [REQ])
        assert not _same(model, base)
        applied.revert()
        assert _same(model, base) and em.edits() == []
