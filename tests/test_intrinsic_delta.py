"""WeightDelta: recording restores on failure, refuses NaN/Inf, reverts bit for bit, and a saved
delta reproduces the edited model exactly on a freshly built base — and only on that base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memedit.errors import IntegrityError
from memedit.evaluation.strategies import weights_digest
from memedit.intrinsic import (
    BaseModelMismatchError,
    DeltaStateError,
    NonFiniteUpdateError,
    WeightDelta,
    apply_edit,
    model_digest,
)
from memedit.types import EditRequest

from .tiny import tiny_llama

DOWN0 = "model.layers.0.mlp.down_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
REQUEST = EditRequest(
    prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
)
FT = {"layer": 1, "lr": 1e-2, "steps": 3}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def test_digest_matches_the_evaluators_weights_digest() -> None:
    model, _ = tiny_llama()
    assert model_digest(model) == weights_digest(model)
    with torch.no_grad():
        model.get_parameter(f"{DOWN0}.weight")[0, 0] += 1.0
    assert model_digest(model) == weights_digest(model)  # the memo noticed the in-place change


def test_record_restores_what_was_written_when_the_block_raises() -> None:
    model, _ = tiny_llama()
    state = _state(model)
    with pytest.raises(KeyboardInterrupt), WeightDelta.record(model, "manual") as delta:
        delta.add_to_matrix(DOWN0, torch.ones(64, 128))
        param = delta.track(f"{DOWN1}.weight")
        with torch.no_grad():
            param.mul_(2.0)  # an in-place change, like an optimiser step
        assert not _equal(model, state)
        raise KeyboardInterrupt
    assert _equal(model, state)
    assert not delta.applied


def test_non_finite_write_is_refused_before_touching_the_model() -> None:
    model, _ = tiny_llama()
    state = _state(model)
    update = torch.zeros(64, 128)
    update[3, 5] = float("inf")
    with (
        pytest.raises(NonFiniteUpdateError, match="1 NaN/Inf"),
        WeightDelta.record(model, "m") as d,
    ):
        d.add_to_matrix(DOWN0, torch.ones(64, 128))  # fine, written
        d.add_to_matrix(DOWN1, update)  # refused; the first write is rolled back too
    assert _equal(model, state)


def test_in_place_nan_is_caught_when_recording_ends() -> None:
    model, _ = tiny_llama()
    state = _state(model)
    with (
        pytest.raises(NonFiniteUpdateError),
        WeightDelta.record(model, "m") as delta,
        torch.no_grad(),
    ):
        delta.track(f"{DOWN0}.weight")[0, 0] = float("nan")
    assert _equal(model, state)


def test_revert_is_bit_exact_and_not_twice() -> None:
    model, _ = tiny_llama()
    state = _state(model)
    with WeightDelta.record(model, "m") as delta:
        delta.add_to_matrix(DOWN0, torch.randn(64, 128) * 1e-3)
        delta.track(f"{DOWN1}.weight")  # tracked but never changed: not part of the delta
    assert delta.names == (f"{DOWN0}.weight",)
    delta.revert()
    assert _equal(model, state)
    with pytest.raises(DeltaStateError, match="not applied"):
        delta.revert()


def test_revert_out_of_order_is_refused_unless_forced() -> None:
    model, _ = tiny_llama()
    state = _state(model)
    with WeightDelta.record(model, "first") as first:
        first.add_to_matrix(DOWN0, torch.full((64, 128), 1e-3))
    with WeightDelta.record(model, "second") as second:
        second.add_to_matrix(DOWN0, torch.full((64, 128), 2e-3))
    with pytest.raises(DeltaStateError, match="newest first"):
        first.revert()
    second.revert()
    first.revert()
    assert _equal(model, state)

    with WeightDelta.record(model, "first") as first:
        first.add_to_matrix(DOWN0, torch.full((64, 128), 1e-3))
    with WeightDelta.record(model, "second") as second:
        second.add_to_matrix(DOWN0, torch.full((64, 128), 2e-3))
    first.revert(force=True)  # back to the originals, second's change included
    assert _equal(model, state)


def test_save_load_apply_reproduces_the_edit_exactly(tmp_path: Path) -> None:
    model, tok = tiny_llama(seed=0)
    delta = apply_edit("ft-m", model, tok, [REQUEST], FT)
    delta.save(tmp_path / "d")
    edited = _state(model)

    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"] == "ft-m" and meta["layers"] == [1]
    assert list(meta["tensors"]) == [f"{DOWN1}.weight"]  # only the changed tensor
    assert meta["hparams"]["lr"] == 1e-2 and meta["requests"][0]["target_new"] == "Paris"
    delta.revert()
    assert meta["base_digest"] == weights_digest(model)  # the digest of the unedited weights

    fresh, _ = tiny_llama(seed=0)
    loaded = WeightDelta.load(tmp_path / "d")
    assert not loaded.applied
    loaded.apply_to(fresh)
    assert _equal(fresh, edited)
    loaded.revert()
    assert weights_digest(fresh) == meta["base_digest"]
    loaded.apply_to(fresh)  # and again after a revert
    assert _equal(fresh, edited)


def test_extras_travel_with_the_delta_and_are_checked(tmp_path: Path) -> None:
    """Tensors a method keeps beside its weights (AlphaEdit's keys) are saved, loaded and
    hash-checked with the delta; a delta without extras loads with none."""
    model, tok = tiny_llama(seed=0)
    delta = apply_edit("ft-m", model, tok, [REQUEST], FT)
    keys = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    plain = WeightDelta.from_bytes(delta.to_bytes())
    assert plain.extras == {}
    delta.extras["method.keys.1"] = keys
    for loaded in (
        WeightDelta.from_bytes(delta.to_bytes()),
        WeightDelta.load(delta.save(tmp_path / "d")),
    ):
        assert list(loaded.extras) == ["method.keys.1"]
        assert torch.equal(loaded.extras["method.keys.1"], keys)
        assert list(loaded.tensors) == [f"{DOWN1}.weight"]  # an extra is not a weight
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    meta["extras"]["method.keys.1"]["sha256"] = "0" * 64
    (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match=r"method\.keys\.1"):
        WeightDelta.load(tmp_path / "d")


def test_apply_to_refuses_another_base_model(tmp_path: Path) -> None:
    model, tok = tiny_llama(seed=0)
    apply_edit("ft-l", model, tok, [REQUEST], FT).save(tmp_path / "d")
    other, _ = tiny_llama(seed=1)
    state = _state(other)
    with pytest.raises(BaseModelMismatchError, match="digest"):
        WeightDelta.load(tmp_path / "d").apply_to(other)
    assert _equal(other, state)


def test_corrupt_tensor_file_is_detected(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, tok = tiny_llama()
    apply_edit("ft-m", model, tok, [REQUEST], FT).save(tmp_path / "d")
    path = tmp_path / "d" / "delta.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(path))
    with pytest.raises(IntegrityError, match="sha256"):
        WeightDelta.load(tmp_path / "d")
    with pytest.raises(IntegrityError, match="not a saved WeightDelta"):
        WeightDelta.load(tmp_path / "missing")


def test_base_digest_needs_the_model_unchanged_elsewhere(tmp_path: Path) -> None:
    """A delta saved after a later edit wrote other weights cannot vouch for its base (even
    once that edit is reverted: in-place writes are all it can see); saved first, it can."""
    model, tok = tiny_llama()
    first = apply_edit("ft-m", model, tok, [REQUEST], FT)
    with WeightDelta.record(model, "other") as later:
        later.add_to_matrix(DOWN0, torch.ones(64, 128) * 1e-3)
    with pytest.raises(DeltaStateError, match="save each delta before the next edit"):
        first.save(tmp_path / "late")
    later.revert()
    first.revert()

    second = apply_edit("ft-m", model, tok, [REQUEST], FT)
    second.save(tmp_path / "d")  # saved before anything else moved: base digest taken now
    with WeightDelta.record(model, "other") as later:
        later.add_to_matrix(DOWN0, torch.ones(64, 128) * 1e-3)
    second.save(tmp_path / "d2")  # already known: saving again is fine
    later.revert()
    second.revert()
    saved = json.loads((tmp_path / "d" / "delta.json").read_text())["base_digest"]
    assert saved == weights_digest(model)
