"""MEMIT and AlphaEdit on tiny random models: a batch raises every target, only the edited
layers' MLP output projections change and revert bit for bit (also on failure midway), a
non-finite update is refused, AlphaEdit's update stays in the null space of the preserved keys
(the paper's closed form, checked against a dense formula) and its sequential state is explicit,
grows only on success and round-trips through a file."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit.errors import IntegrityError, InvalidRequestError
from memedit.intrinsic import (
    AlphaEditHparams,
    AlphaEditState,
    KeyStatistics,
    MemitHparams,
    NonFiniteUpdateError,
    TextList,
    apply_edit,
    method_names,
)
from memedit.intrinsic.alphaedit import alphaedit_update, null_space_basis
from memedit.intrinsic.compute import least_squares_update, subject_keys
from memedit.intrinsic.values import context_prefixes
from memedit.metrics import completion_log_likelihood, teacher_forced_accuracy
from memedit.types import EditRequest

from .test_intrinsic_methods import BUILDERS, TEXT, _changed, _no_hooks, _same, _snapshot
from .tiny import tiny_llama

METHODS = ("memit", "alphaedit")
# Subjects end their prompts (see test_intrinsic_methods): distinct last subject tokens.
BATCH = (
    EditRequest(
        prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
    ),
    EditRequest(prompt="Q: the capital of France", target_new="Berlin", subject="France"),
    EditRequest(
        prompt="What is the name of the spouse of a person", target_new="blue", subject="person"
    ),
)
LATER = EditRequest(prompt="The place of death of Leo", target_new="sky", subject="Leo")
# Statistics text: the tiny tokenizer's words shuffled (2342 tokens), so that E[kkᵀ] has full
# rank — with repeated texts it would not, and MEMIT would write huge updates into its null
# directions.
_WORDS = " ".join(TEXT.items[:2]).replace("?", " ?").replace(".", " .").split()
_RNG = random.Random(0)
MIXED = TextList(tuple(" ".join(_RNG.choices(_WORDS, k=24)) for _ in range(80)), name="mixed")
# Random models have tiny keys and weights: let the value grow, and weigh the ridges to match.
VALUE_HP: dict[str, Any] = {"layers": (0, 1), "v_weight_decay": 0.0, "clamp_norm_factor": 100.0}
HP: dict[str, dict[str, Any]] = {
    "memit": {**VALUE_HP, "mom2_update_weight": 10.0},
    "alphaedit": {**VALUE_HP, "l2_weight": 1e-3, "nullspace_threshold": 0.1},
}
DOWN = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")


@pytest.fixture
def stats() -> Iterator[KeyStatistics]:
    with tempfile.TemporaryDirectory() as root:
        yield KeyStatistics(MIXED, root=root, progress=False)


def _loglik(model: torch.nn.Module, tok: Any, requests: Any) -> list[float]:
    return completion_log_likelihood(
        model, tok, [r.prompt for r in requests], [r.target_new for r in requests]
    )


def _prefixes(model: torch.nn.Module, tok: Any) -> tuple[str, ...]:
    hp = AlphaEditHparams()
    return context_prefixes(model, tok, hp.n_prefixes, hp.prefix_tokens, hp.prefix_seed)


def test_methods_are_registered() -> None:
    assert set(METHODS) <= set(method_names())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_raises_every_target_then_reverts_bit_exact(
    method: str, arch: str, stats: KeyStatistics
) -> None:
    model, tok = BUILDERS[arch]()
    snap = _snapshot(model)
    before = _loglik(model, tok, BATCH)
    delta = apply_edit(method, model, tok, list(BATCH), HP[method], stats=stats)
    after = _loglik(model, tok, BATCH)
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    acc = teacher_forced_accuracy(
        model, tok, [r.prompt for r in BATCH], [r.target_new for r in BATCH]
    )
    assert acc == [1.0, 1.0, 1.0]
    # the updates close most of the gap to the optimised last-layer values
    first, *_, last = delta.info["residual_norm"]
    assert last < 0.25 * first
    assert len(delta.info["value_nll"]) == len(BATCH)
    mlp = (
        ("transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight")
        if arch == "gpt2"
        else DOWN
    )
    assert _changed(model, snap) == list(mlp) and set(delta.names) == set(mlp)
    assert all(torch.isfinite(t).all() for t in delta.tensors.values())
    assert _no_hooks(model)
    delta.revert()
    assert _same(model, snap)  # torch.equal on every tensor
    assert stats.computed == 2  # one statistics pass per layer, on the unedited weights


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_update_is_refused(
    method: str, stats: KeyStatistics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memedit.intrinsic.alphaedit as alphaedit
    import memedit.intrinsic.memit as memit

    model, tok = tiny_llama()
    snap = _snapshot(model)
    state = AlphaEditState() if method == "alphaedit" else None
    if method == "memit":
        real = memit.least_squares_update
        monkeypatch.setattr(memit, "least_squares_update", lambda *a: real(*a) * float("nan"))
    else:
        real_a = alphaedit.alphaedit_update
        monkeypatch.setattr(alphaedit, "alphaedit_update", lambda *a: real_a(*a) * float("nan"))
    with pytest.raises(NonFiniteUpdateError, match="NaN/Inf"):
        apply_edit(method, model, tok, list(BATCH), HP[method], stats=stats, state=state)
    assert _same(model, snap)
    if state is not None:
        assert state.requests == 0 and not state.preserved


@pytest.mark.parametrize("method", METHODS)
def test_failure_at_a_later_layer_restores_the_earlier_one(
    method: str, stats: KeyStatistics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memedit.intrinsic.alphaedit as alphaedit
    import memedit.intrinsic.memit as memit

    model, tok = tiny_llama()
    snap = _snapshot(model)
    module, name = (
        (memit, "least_squares_update") if method == "memit" else (alphaedit, "alphaedit_update")
    )
    real = getattr(module, name)
    calls = {"n": 0}

    def failing(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            assert _changed(model, snap) == [DOWN[0]]  # layer 0 is written
            raise RuntimeError("injected")
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, name, failing)
    state = AlphaEditState() if method == "alphaedit" else None
    with pytest.raises(RuntimeError, match="injected"):
        apply_edit(method, model, tok, list(BATCH), HP[method], stats=stats, state=state)
    assert calls["n"] == 2 and _same(model, snap) and _no_hooks(model)
    if state is not None:
        assert state.requests == 0 and not state.preserved


def _dense_alphaedit(
    keys: torch.Tensor, resid: torch.Tensor, p: torch.Tensor, kp: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The paper's form with keys as columns: R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + α I)⁻¹."""
    k1, r = keys.T, resid.T
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    return r @ k1.T @ p @ torch.linalg.inv(kp @ kp.T @ p + k1 @ k1.T @ p + alpha * eye)


def test_alphaedit_update_is_the_papers_and_stays_in_the_null_space() -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 24, 10
    # preserved keys K0 spanning 16 of the 24 directions (8 truly null) plus a weak direction
    k0 = torch.randn(16, 400, generator=g, dtype=torch.float64)
    mix = torch.randn(d_in, 16, generator=g, dtype=torch.float64)
    cov = (mix @ k0) @ (mix @ k0).T / 400
    keys = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    kp = torch.randn(d_in, 5, generator=g, dtype=torch.float64)
    basis = null_space_basis(cov, 1e-6)
    assert basis.shape == (d_in, 8)
    torch.testing.assert_close(basis.T @ basis, torch.eye(8, dtype=torch.float64))
    p = basis @ basis.T
    for preserved, kp_cols in ((None, torch.zeros(d_in, 1, dtype=torch.float64)), (kp @ kp.T, kp)):
        upd = alphaedit_update(keys, resid, basis, preserved, 0.5)
        torch.testing.assert_close(upd, _dense_alphaedit(keys, resid, p, kp_cols, 0.5))
        eye = torch.eye(d_in, dtype=torch.float64)
        assert float((upd @ (eye - p)).abs().max()) < 1e-12 * float(upd.abs().max())
        # the preserved knowledge's outputs do not move: Δ K0 = 0
        assert float((upd @ mix @ k0).norm()) < 1e-10 * float(upd.norm() * (mix @ k0).norm())
    # with the whole space as basis it is MEMIT's least squares with covariance Kp Kpᵀ + α I
    full = torch.eye(d_in, dtype=torch.float64)
    torch.testing.assert_close(
        alphaedit_update(keys, resid, full, kp @ kp.T, 0.5),
        least_squares_update(keys, resid, kp @ kp.T + 0.5 * full),
    )


def test_alphaedit_general_weight_is_memits_term_inside_the_null_space() -> None:
    """``general`` (λC) adds MEMIT's key-statistics term to the solve in ``B``'s coordinates:
    with the whole space as basis it is MEMIT's least squares with ``λC + α I``; inside a real
    null space the update stays there and the statistics' keys move less than without it."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 24, 10
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -4, d_in, dtype=torch.float64)  # no exact null space
    cov = mix @ torch.diag(scale) @ mix.T / d_in
    keys = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(4, d_out, generator=g, dtype=torch.float64)
    full = torch.eye(d_in, dtype=torch.float64)
    torch.testing.assert_close(
        alphaedit_update(keys, resid, full, None, 0.5, general=100.0 * cov),
        least_squares_update(keys, resid, 100.0 * cov + 0.5 * full),
    )
    basis = null_space_basis(cov, 1e-2)
    assert 0 < basis.shape[1] < d_in
    plain = alphaedit_update(keys, resid, basis, None, 0.5)
    held = alphaedit_update(keys, resid, basis, None, 0.5, general=1e4 * cov)
    p = basis @ basis.T
    assert float((held - held @ p).abs().max()) < 1e-12 * float(held.abs().max())
    moved = [float(torch.trace(u @ cov @ u.T)) for u in (plain, held)]  # E‖Δk‖² over C's keys
    assert moved[1] < 0.5 * moved[0], moved
    with pytest.raises(InvalidRequestError, match="general_weight"):
        AlphaEditHparams(general_weight=float("nan"))


def test_alphaedit_written_update_stays_in_the_null_space(stats: KeyStatistics) -> None:
    """What the projection guarantees on the model: each layer's weight change ``Δ`` satisfies
    ``Δ (I − P) = 0`` (up to the float32 rounding of the weights), so the statistics' keys move
    by at most ``threshold · λ_max · ‖Δ‖²`` in mean square (``E‖Δk‖² = tr(Δ C Δᵀ)``); MEMIT's
    update of the same requests does not stay there."""
    hp = HP["alphaedit"]
    outside = {}
    for method in METHODS:
        model, tok = tiny_llama()
        snap = _snapshot(model)
        delta = apply_edit(method, model, tok, list(BATCH), HP[method], stats=stats)
        for layer, name in enumerate(DOWN):
            cov = stats.second_moment(model, tok, layer, 100_000)
            basis = null_space_basis(cov, hp["nullspace_threshold"])
            change = model.get_parameter(name).detach().double() - snap[name].double()
            rest = change - change @ basis @ basis.T
            outside[(method, layer)] = float(rest.norm() / change.norm())
            if method == "alphaedit":
                assert delta.info["null_space_dims"][str(layer)] == basis.shape[1] < cov.shape[0]
                bound = hp["nullspace_threshold"] * float(torch.linalg.eigvalsh(cov).max())
                assert float(torch.trace(change @ cov @ change.T)) <= bound * float(
                    change.norm() ** 2
                )
    assert max(outside[("alphaedit", layer)] for layer in (0, 1)) < 1e-4, outside
    assert min(outside[("memit", layer)] for layer in (0, 1)) > 0.01, outside


def test_alphaedit_state_accumulates_and_protects_earlier_edits(
    stats: KeyStatistics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memedit.intrinsic.alphaedit as alphaedit

    model, tok = tiny_llama()
    keys0 = subject_keys(model, tok, 0, list(BATCH), _prefixes(model, tok)).mean.double()
    state = AlphaEditState()
    hp = HP["alphaedit"]
    first = apply_edit("alphaedit", model, tok, list(BATCH), hp, stats=stats, state=state)
    assert state.requests == 3 and set(state.preserved) == {0, 1} == set(state.bases)
    assert first.info["preserved_requests"] == 0
    # the state holds Σ k kᵀ of the keys each layer was solved with (layer 0: the unedited ones)
    torch.testing.assert_close(state.preserved[0], keys0.T @ keys0)
    saved = state.copy()

    # one layer: keys, residuals and (kept in the state) the basis are the same with and
    # without the preserved keys, so their term can only lower how far those keys move,
    # tr(Δ K_pᵀK_p Δᵀ)
    def moved(edit_state: AlphaEditState) -> float:
        edited, _ = tiny_llama()
        edited.load_state_dict(model.state_dict())
        before = edited.get_parameter(DOWN[1]).detach().double().clone()
        hp1 = {**hp, "layers": (1,)}
        apply_edit("alphaedit", edited, tok, [LATER], hp1, stats=stats, state=edit_state)
        change = edited.get_parameter(DOWN[1]).detach().double() - before
        return float(torch.trace(change @ saved.preserved[1] @ change.T))

    no_keys = state.copy()
    no_keys.preserved.clear()
    assert moved(state.copy()) < 0.9 * moved(no_keys)
    # the state is saved and loaded as tensors, and a loaded one is what the next call uses
    path = state.save(tmp_path / "state.safetensors")
    loaded = AlphaEditState.load(path)
    assert loaded.requests == saved.requests and loaded.thresholds == saved.thresholds
    for layer in (0, 1):
        assert torch.equal(loaded.preserved[layer], saved.preserved[layer].cpu())
        assert torch.equal(loaded.bases[layer], saved.bases[layer].cpu())
    seen: list[Any] = []
    real = alphaedit.alphaedit_update

    def spy(*args: Any) -> torch.Tensor:
        seen.append(args[3])
        return real(*args)

    monkeypatch.setattr(alphaedit, "alphaedit_update", spy)
    delta = apply_edit("alphaedit", model, tok, [LATER], hp, stats=stats, state=loaded)
    assert seen[0] is not None and torch.equal(seen[0], saved.preserved[0].cpu())
    assert loaded.requests == 4 and delta.info["preserved_requests"] == 3
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bogus))
    with pytest.raises(IntegrityError, match="not a memedit-alphaedit-state"):
        AlphaEditState.load(bogus)


def test_state_is_checked(stats: KeyStatistics) -> None:
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError, match="memit takes no state") as info:
        apply_edit("memit", model, tok, list(BATCH), HP["memit"], stats=stats, state=object())
    assert info.value.field == "state"
    with pytest.raises(InvalidRequestError, match="takes a AlphaEditState") as info:
        apply_edit("alphaedit", model, tok, [LATER], HP["alphaedit"], stats=stats, state={})
    assert info.value.field == "state"
    other = AlphaEditState()
    other.preserved[0] = torch.zeros(7, 7, dtype=torch.float64)
    with pytest.raises(InvalidRequestError, match="7 keys wide") as info:
        apply_edit("alphaedit", model, tok, [LATER], HP["alphaedit"], stats=stats, state=other)
    assert info.value.field == "state"
    with pytest.raises(InvalidRequestError, match="leaves no null-space direction") as info:
        AlphaEditState().basis(0, torch.eye(4, dtype=torch.float64), 0.5)
    assert info.value.field == "nullspace_threshold"


@pytest.mark.parametrize(
    ("cls", "options", "field"),
    [
        (MemitHparams, {"mom2_update_weight": -1.0}, "mom2_update_weight"),
        (MemitHparams, {"layers": (1, 0)}, "layers"),
        (MemitHparams, {"layers": (1, 1)}, "layers"),
        (MemitHparams, {"stats_tokens": 0}, "stats_tokens"),
        (MemitHparams, {"v_steps": 0}, "v_steps"),
        (AlphaEditHparams, {"l2_weight": 0.0}, "l2_weight"),
        (AlphaEditHparams, {"nullspace_threshold": float("nan")}, "nullspace_threshold"),
        (AlphaEditHparams, {"nullspace_threshold": "1e-2"}, "nullspace_threshold"),
    ],
)
def test_hparams_are_validated_naming_the_field(
    cls: type, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        cls(**options)
    assert info.value.field == field


def test_default_layers_and_options(stats: KeyStatistics) -> None:
    from memedit.intrinsic import DEFAULT_LAYERS

    assert DEFAULT_LAYERS[("llama", 30, 576)]["memit"][-1] >= 1
    model, tok = tiny_llama()
    # a 2-layer model falls back to a fraction of its depth; options as a strategy spec gives them
    delta = apply_edit("memit", model, tok, [LATER], {"v_steps": 2}, stats=stats)
    assert delta.layers == (0,) and delta.hparams["layers"] == [0]
    assert delta.hparams["mom2_update_weight"] == MemitHparams().mom2_update_weight
    delta.revert()
    delta = apply_edit(
        "alphaedit", model, tok, [LATER], {"layers": "0:1", "v_steps": 2}, stats=stats
    )
    assert delta.layers == (0, 1) and delta.info["value_steps"] == [2]
    with pytest.raises(InvalidRequestError, match="unknown MemitHparams field") as info:
        apply_edit("memit", model, tok, [LATER], {"mom2_weight": 1.0}, stats=stats)
    assert info.value.field == "mom2_weight"
