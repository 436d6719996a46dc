"""T-Patcher (``adapter:tpatcher``) on tiny random Llamas: a trained patch neuron flips the
edit's answer while unrelated inputs run bit for bit as unedited; no patch means no hook;
rolling any edit back gives exactly the outputs without it; the payload round-trips (a fresh
model answers the same); bad hyperparameters are refused naming the field; NaN/Inf patches are
refused in training and on commit; the head-only training shortcut equals the full forward;
and the wrapper logs, restores and rolls back patches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.adapters import NonFiniteAdapterError, Patch, TPatcherAdapter, get_adapter
from memedit.adapters.tpatcher import (
    MEMORY_TEXTS,
    _FullRunner,
    _head,
    _HeadRunner,
    patch_from_bytes,
    patch_to_bytes,
)
from memedit.errors import IntegrityError
from memedit.evaluation.strategies import parse_strategy
from memedit.intrinsic.compute import target_batch
from memedit.metrics import teacher_forced_accuracy

from .adapter_kit import hook_count, logits, wrap_tiny
from .tiny import tiny_llama

HP = {"memory_size": 0, "steps": 300, "lr": 0.1, "value_lr": 0.2}
REQ = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
REQ2 = EditRequest(prompt="The capital of France is", target_new="Berlin", subject="France")
UNRELATED = [MEMORY_TEXTS[0], MEMORY_TEXTS[2]]
MODULE = "model.layers.1.mlp"


def _acc(model: Any, tok: Any, reqs: list[EditRequest]) -> list[float]:
    return teacher_forced_accuracy(
        model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs]
    )


def test_a_patch_flips_the_answer_and_leaves_unrelated_inputs_bit_for_bit() -> None:
    model, tok = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = TPatcherAdapter(model)
    base = [logits(model, tok, t) for t in UNRELATED]
    assert _acc(model, tok, [REQ]) != [1.0]
    payloads = adapter.prepare(tok, [REQ, REQ2], HP)
    assert adapter.edit_ids() == [] and hook_count(model) == 0  # trained, not active
    adapter.commit([1, 2], payloads)
    patch = adapter.patch(1)  # one neuron per target token ("Paris": two here)
    n = len(tok(f"{REQ.prompt} Paris")["input_ids"]) - len(tok(REQ.prompt)["input_ids"])
    assert patch.module == MODULE and patch.neurons == n
    assert patch.key.shape == (n, 64) and patch.value.shape == (n, 64) and patch.bias.shape == (n,)
    with adapter.active():
        assert hook_count(model) == 2  # one FFN: its input kept, its output patched
        assert _acc(model, tok, [REQ, REQ2]) == [1.0, 1.0]
        for text, before in zip(UNRELATED, base, strict=True):
            assert torch.equal(logits(model, tok, text), before), text
    assert hook_count(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no write


def test_no_patch_no_hook_and_hooks_go_on_an_exception() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    with adapter.active():
        assert hook_count(model) == 0
    adapter.commit([1], adapter.prepare(tok, [REQ], HP))
    with pytest.raises(RuntimeError, match="boom"), adapter.active():
        assert hook_count(model) == 2
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    adapter.remove(1)
    with adapter.active():
        assert hook_count(model) == 0


def test_rollback_of_any_edit_is_exact() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    p1, p2 = adapter.prepare(tok, [REQ, REQ2], HP)
    base = [logits(model, tok, r.prompt) for r in (REQ, REQ2)]
    adapter.commit([1], [p1])
    with adapter.active():
        one = [logits(model, tok, r.prompt) for r in (REQ, REQ2)]
    adapter.commit([2], [p2])
    adapter.remove(2)  # the newest: exactly the outputs before it
    with adapter.active():
        assert all(
            torch.equal(logits(model, tok, r.prompt), o)
            for r, o in zip((REQ, REQ2), one, strict=True)
        )
    adapter.commit([2], [p2])
    adapter.remove(1)  # an older one: exactly the outputs with edit 2 alone
    alone = TPatcherAdapter(model)
    alone.commit([2], [p2])
    for r in (REQ, REQ2):
        with adapter.active():
            now = logits(model, tok, r.prompt)
        with alone.active():
            assert torch.equal(now, logits(model, tok, r.prompt))
    adapter.remove(2)
    with adapter.active():
        assert all(
            torch.equal(logits(model, tok, r.prompt), b)
            for r, b in zip((REQ, REQ2), base, strict=True)
        )
    assert adapter.edit_ids() == []


def test_the_payload_round_trips_onto_a_fresh_model() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    [blob] = adapter.prepare(tok, [REQ], HP)
    patch = patch_from_bytes(blob)
    again = patch_from_bytes(patch_to_bytes(patch))
    for name in ("key", "bias", "value", "queries"):
        assert torch.equal(getattr(again, name), getattr(patch, name))
    assert (again.module, again.label) == (MODULE, "Paris")
    adapter.commit([1], [blob])
    fresh, _ = tiny_llama()
    restored = TPatcherAdapter(fresh)
    restored.commit([1], [blob])
    with adapter.active():
        live = logits(model, tok, REQ.prompt)
    with restored.active():
        assert torch.equal(logits(fresh, tok, REQ.prompt), live)
    with pytest.raises(IntegrityError):
        patch_from_bytes(b"not a patch")
    with pytest.raises(IntegrityError, match="corrupt"):
        patch_from_bytes(blob[:-10])


def _with_bias(blob: bytes, bias: float) -> bytes:
    """The payload with every bias set to ``bias`` (written past Patch's own check)."""
    from safetensors.torch import load, save

    magic = len(b"MEMEDIT-TPATCHER\x00")
    end = magic + 8 + int.from_bytes(blob[magic : magic + 8], "little")
    tensors = load(blob[end:])
    tensors["bias"] = torch.full_like(tensors["bias"], bias)
    return blob[:end] + save(tensors)


def test_non_finite_patches_are_refused_in_training_and_on_commit() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    [blob] = adapter.prepare(tok, [REQ], HP)
    with pytest.raises(NonFiniteAdapterError, match="bias"):
        adapter.commit([1], [_with_bias(blob, float("nan"))])
    good = patch_from_bytes(blob)
    with pytest.raises(NonFiniteAdapterError, match="value"):
        Patch(MODULE, good.key, good.bias, torch.full_like(good.value, float("inf")), good.queries)
    assert adapter.edit_ids() == [] and hook_count(model) == 0
    head = model.lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[0] = float("nan")
        with pytest.raises(NonFiniteAdapterError, match="diverged"):
            adapter.prepare(tok, [REQ], HP)
    finally:
        with torch.no_grad():
            head.copy_(saved)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bound": 0.5}, "bound"),
        ({"memory_size": -1}, "memory_size"),
        ({"value_lr": 0.0}, "value_lr"),
        ({"stop_prob": 1.0}, "stop_prob"),
        ({"per_token": "yes"}, "per_token"),
        ({"quiet_after": 1}, "quiet_after"),
        ({"layer": 5}, "layer"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_hparams_are_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError, match=field) as info:
        TPatcherAdapter(model).prepare(tok, [REQ], {**HP, **options})
    assert info.value.field == field


def test_the_head_shortcut_equals_the_full_forward_and_lower_layers_train_too() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    batch = target_batch(tok, [(REQ.prompt, REQ.target_new)], torch.device("cpu"))
    runner, queries = adapter._runner(batch, MODULE, 1)
    assert isinstance(runner, _HeadRunner) and queries.shape == (int(batch.keep.sum()), 64)
    full = _FullRunner(adapter, batch, MODULE, runner.scale)
    added = torch.randn(queries.shape) * runner.scale
    torch.testing.assert_close(runner.token_logprobs(added), full.token_logprobs(added))
    assert _head(model, 0) is None  # not the last block: the whole forward runs
    [blob] = adapter.prepare(tok, [REQ], {**HP, "layer": 0})
    adapter.commit([1], [blob])
    assert adapter.patch(1).module == "model.layers.0.mlp"
    with adapter.active():
        assert _acc(model, tok, [REQ]) == [1.0]


def test_one_neuron_per_edit_as_in_the_paper_also_flips_the_answer() -> None:
    model, tok = tiny_llama()
    adapter = TPatcherAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], {**HP, "per_token": False}))
    assert adapter.patch(1).neurons == 1
    with adapter.active():
        assert _acc(model, tok, [REQ]) == [1.0]


def test_no_neuron_fires_once_the_answer_has_been_read() -> None:
    # in generation the token after the answer is predicted at the target's last token: a
    # neuron firing there says (part of) the answer again ("Moulin Moulin Moulin ...")
    from memedit.intrinsic.compute import capture

    model, tok = tiny_llama()
    req = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris Leo", subject="Leo")
    adapter = TPatcherAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [req], HP))
    patch = adapter.patch(1)
    assert patch.neurons >= 2
    ids = tok(f"{req.prompt} {req.target_new}", return_tensors="pt")["input_ids"]
    inputs, _ = capture(model, MODULE, ids, torch.ones_like(ids))
    z = inputs[0].float() @ patch.key.T + patch.bias
    assert float(z[-1].max()) < 0.0  # silent after the answer
    own = z[-1 - patch.neurons : -1].diagonal()
    assert bool((own > 0.0).all())  # each neuron fires at its own position
    with adapter.active():
        assert _acc(model, tok, [req]) == [1.0]


def test_the_patch_follows_the_model_dtype() -> None:
    model, tok = tiny_llama()
    [blob] = TPatcherAdapter(model).prepare(tok, [REQ], HP)
    double = model.to(torch.float64)
    adapter = TPatcherAdapter(double)
    adapter.commit([1], [blob])
    with adapter.active():
        out = logits(double, tok, REQ.prompt)
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())


def test_the_wrapper_logs_restores_and_rolls_back_patches(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    assert get_adapter("tpatcher") is TPatcherAdapter
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        base = em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
        records = em.edit([REQ, REQ2], strategy="adapter", method="tpatcher", **HP)
        assert [r.method for r in records] == ["tpatcher", "tpatcher"]
        assert em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]) == [1.0, 1.0]
        with em.adapted():
            edited = logits(model, tok, REQ.prompt)
        em.memory.save()
        fresh, _ = tiny_llama()
        with wrap_tiny(fresh, tok, tmp_path / "mem") as again, again.adapted():
            assert torch.equal(logits(fresh, tok, REQ.prompt), edited)
        em.rollback(records[0].id)
        em.rollback(records[1].id)
        assert em.edits() == []
        assert em.teacher_forced([REQ.prompt, REQ2.prompt], ["Paris", "Berlin"]) == base
        assert hook_count(model) == 0


def test_the_evaluator_runs_adapter_tpatcher_without_a_change(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    strategy = parse_strategy("adapter:tpatcher@memory_size=0;steps=150;lr=0.1;value_lr=0.2")
    assert strategy.name == "adapter:tpatcher"
    with wrap_tiny(model, tok, tmp_path / "mem") as em:
        before = logits(model, tok, REQ.prompt)
        applied = strategy.apply(em, [REQ])
        assert em.teacher_forced([REQ.prompt], ["Paris"]) == [1.0]
        applied.revert()
        assert em.edits() == []
        with em.adapted():
            assert torch.equal(logits(model, tok, REQ.prompt), before)
