"""In-weight methods (ROME, FT-L, FT-M) on tiny random models: every edit reverts bit for bit
(also when it fails midway), a non-finite update is refused with the model untouched, ROME
moves the target's probability by changing exactly one matrix, on Llama and GPT-2 (Conv1D)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from memedit.errors import InvalidRequestError
from memedit.intrinsic import (
    FtMHparams,
    KeyStatistics,
    NonFiniteUpdateError,
    RomeHparams,
    TextList,
    apply_edit,
    method_names,
)
from memedit.metrics import completion_log_likelihood, teacher_forced_accuracy
from memedit.types import EditRequest

from .tiny import tiny_llama, tiny_tokenizer

METHODS = ("rome", "ft-l", "ft-m")
# The subject ends the prompt, so in a 2-layer random model the edited MLP output reaches the
# position that predicts the target directly (there is no later layer to carry it further).
REQUEST = EditRequest(
    prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
)
SECOND = EditRequest(prompt="Q: the capital of France", target_new="Berlin", subject="France")
TEXT = TextList(
    (
        "The capital of France is Paris. Where did Leo Arons die? The place of death of Leo "
        "Arons is Berlin.",
        "Q: A: What is the name of the spouse of a person? The sky is blue.",
    )
    * 10,
    name="tiny",
)
# Random models have tiny weights: let the value vector grow enough to matter.
ROME_HP = {"layer": 1, "v_weight_decay": 0.0, "clamp_norm_factor": 100.0}
FT_HP = {"layer": 1, "lr": 1e-2, "steps": 5}


def tiny_gpt2(seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer GPT-2 (Conv1D projections, stored transposed) with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval(), tok


def _tiny_decoder(model_type: str) -> Any:
    def build(seed: int = 0) -> tuple[Any, Any]:
        import transformers as T

        from .tiny_models import _DECODER

        tok = tiny_tokenizer()
        torch.manual_seed(seed)
        config = T.AutoConfig.for_model(model_type, **{**_DECODER, "vocab_size": len(tok)})
        return T.AutoModelForCausalLM.from_config(config).eval(), tok

    return build


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "qwen2": _tiny_decoder("qwen2"),
    "gemma2": _tiny_decoder("gemma2"),  # norms after the MLP output
}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stats() -> Iterator[KeyStatistics]:
    with tempfile.TemporaryDirectory() as root:
        yield KeyStatistics(TEXT, root=root, progress=False)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, snap[n]) for n, t in model.state_dict().items())


def _changed(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in model.state_dict().items() if not torch.equal(t, snap[n]))


def _hp(method: str) -> dict[str, Any]:
    return dict(ROME_HP if method == "rome" else FT_HP)


def _no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_methods_are_registered() -> None:
    assert set(METHODS) <= set(method_names())


@pytest.mark.parametrize("method", METHODS)
def test_edit_then_revert_is_bit_exact(method: str, arch: str, stats: KeyStatistics) -> None:
    model, tok = BUILDERS[arch]()
    snap = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    delta = apply_edit(method, model, tok, [REQUEST, SECOND], _hp(method), stats=stats)
    assert delta.applied and _changed(model, snap)  # the edit did something
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _no_hooks(model)
    delta.revert()
    assert _same(model, snap)
    assert not delta.applied


@pytest.mark.parametrize("method", METHODS)
def test_exception_midway_restores_everything(
    method: str, arch: str, stats: KeyStatistics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second request (ROME) or the third optimisation pass (FT) raises after weights were
    already written: they are restored and the error propagates."""
    import memedit.intrinsic.ft as ft
    import memedit.intrinsic.rome as rome

    model, tok = BUILDERS[arch]()
    snap = _snapshot(model)
    calls = {"n": 0}
    if method == "rome":
        real = rome.optimise_value

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                assert _changed(model, snap)  # the first request's update is in the model
                raise RuntimeError("injected")
            return real(*args, **kwargs)

        monkeypatch.setattr(rome, "optimise_value", failing)
    else:
        objective = "prompt_last" if method == "ft-l" else "target"
        real_loss = ft._LOSSES[objective]

        def failing_loss(*args: Any) -> tuple[torch.Tensor, bool]:
            if not torch.is_grad_enabled():  # FT-M's pass reading the unedited distributions
                return real_loss(*args)
            calls["n"] += 1
            if calls["n"] == 3:
                assert _changed(model, snap)
                raise RuntimeError("injected")
            return real_loss(*args)

        monkeypatch.setitem(ft._LOSSES, objective, failing_loss)
    hp = _hp(method) if method == "rome" else {**_hp(method), "batch_size": 1}
    with pytest.raises(RuntimeError, match="injected"):
        apply_edit(method, model, tok, [REQUEST, SECOND], hp, stats=stats)
    assert calls["n"] >= 2
    assert _same(model, snap)
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_update_is_refused(
    method: str, stats: KeyStatistics, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memedit.intrinsic.ft as ft
    import memedit.intrinsic.rome as rome

    model, tok = tiny_llama()
    snap = _snapshot(model)
    if method == "rome":
        real = rome.rank_one_update
        monkeypatch.setattr(rome, "rank_one_update", lambda *a: real(*a) * float("nan"))
    else:
        objective = "prompt_last" if method == "ft-l" else "target"
        real_loss = ft._LOSSES[objective]

        def nan_loss(*a: Any) -> tuple[torch.Tensor, bool]:
            loss, solved = real_loss(*a)
            return loss * float("nan"), solved

        monkeypatch.setitem(ft._LOSSES, objective, nan_loss)
    with pytest.raises(NonFiniteUpdateError, match="NaN/Inf"):
        apply_edit(method, model, tok, [REQUEST], _hp(method), stats=stats)
    assert _same(model, snap)


def test_rome_raises_target_probability_and_touches_one_matrix(
    arch: str, stats: KeyStatistics
) -> None:
    model, tok = BUILDERS[arch]()
    snap = _snapshot(model)
    before = completion_log_likelihood(model, tok, [REQUEST.prompt], [REQUEST.target_new])[0]
    delta = apply_edit("rome", model, tok, [REQUEST], ROME_HP, stats=stats)
    after = completion_log_likelihood(model, tok, [REQUEST.prompt], [REQUEST.target_new])[0]
    assert after > before + 0.3
    assert teacher_forced_accuracy(model, tok, [REQUEST.prompt], [REQUEST.target_new]) == [1.0]
    # the update realises the optimised value: the bare prompt now scores about what the value
    # optimisation reached (its NLL is a mean over the context prefixes)
    assert abs(-after - delta.info["value_nll"][0]) < 0.1
    gpt2 = arch == "gpt2"
    mlp_out = "transformer.h.1.mlp.c_proj.weight" if gpt2 else "model.layers.1.mlp.down_proj.weight"
    assert _changed(model, snap) == [mlp_out]
    assert delta.names == (mlp_out,)
    # the rank-one structure: one singular value carries the whole change
    diff = (model.get_parameter(mlp_out).detach() - snap[mlp_out]).double()
    s = torch.linalg.svdvals(diff)
    assert float(s[1] / s[0]) < 1e-5
    assert stats.computed == 1


def test_rome_without_covariance_does_not_read_statistics(stats: KeyStatistics) -> None:
    model, tok = tiny_llama()
    delta = apply_edit(
        "rome", model, tok, REQUEST, {**ROME_HP, "mom2_adjustment": False}, stats=stats
    )
    assert delta.applied and stats.computed == 0 and stats.loaded == 0


def test_ft_m_learns_the_target_tokens(stats: KeyStatistics) -> None:
    model, tok = tiny_llama()
    target = "Berlin Paris"  # several tokens: FT-M scores each after its prefix
    req = EditRequest(prompt=REQUEST.prompt, target_new=target, subject=REQUEST.subject)
    before = completion_log_likelihood(model, tok, [req.prompt], [target])[0]
    delta = apply_edit("ft-m", model, tok, [req], {"layer": 1, "lr": 5e-2, "steps": 10})
    after = completion_log_likelihood(model, tok, [req.prompt], [target])[0]
    assert after > before + 1.0
    assert delta.info["losses"][-1] < delta.info["losses"][0]


def test_ft_l_norm_constraint_bounds_every_weight() -> None:
    model, tok = tiny_llama()
    name = "model.layers.0.mlp.down_proj.weight"
    original = model.get_parameter(name).detach().clone()
    apply_edit("ft-l", model, tok, [REQUEST], {"layer": 0, "lr": 1e-1, "norm_constraint": 1e-3})
    change = (model.get_parameter(name).detach() - original).abs().max()
    assert 0 < float(change) <= 1e-3 + 1e-7


def test_hparams_are_validated_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="v_lr") as info:
        RomeHparams(v_lr=-1.0)
    assert info.value.field == "v_lr"
    with pytest.raises(InvalidRequestError, match="exactly one layer"):
        RomeHparams(layers=(1, 2))
    with pytest.raises(InvalidRequestError, match="steps"):
        FtMHparams(steps=0)
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError, match="unknown RomeHparams field") as unknown:
        apply_edit("rome", model, tok, [REQUEST], {"lyaer": 1})
    assert unknown.value.field == "lyaer"
    with pytest.raises(InvalidRequestError, match="out of range for a 2-layer model"):
        apply_edit("rome", model, tok, [REQUEST], {"layer": 7})
    with pytest.raises(InvalidRequestError, match="unknown in-weight method 'nope'"):
        apply_edit("nope", model, tok, [REQUEST])
    # options as a strategy spec gives them (weights:ft-m@layers=0:1;lr=0.01)
    delta = apply_edit("ft-m", model, tok, [REQUEST], {"layers": "0:1", "lr": 0.01, "steps": 1})
    assert delta.layers == (0, 1) and len(delta.names) == 2


def test_default_layer_and_metadata(stats: KeyStatistics) -> None:
    model, tok = tiny_llama()
    delta = apply_edit("rome", model, tok, [REQUEST], RomeHparams(v_steps=2), stats=stats)
    assert delta.method == "rome" and len(delta.layers) == 1
    assert delta.hparams["layers"] == list(delta.layers) and delta.hparams["v_steps"] == 2
    assert delta.requests == [
        {"prompt": REQUEST.prompt, "target_new": "Paris", "subject": "Leo Arons"}
    ]
    assert delta.info["value_steps"] == [2]


def test_neighbour_prompts_enter_the_value_loss(stats: KeyStatistics) -> None:
    """Neighbour templates add the KL of their next-token distributions to ROME's value loss
    (how much that helps locality is measured on the real model: benchmarks/rome_edit.py)."""

    def losses(factor: float) -> tuple[float, float]:
        model, tok = tiny_llama()
        hp = {
            **ROME_HP,
            "kl_factor": 0.0,  # v_weight_decay is 0 too: the loss is the NLL plus neighbours
            "neighbour_templates": ("Where did {}",),
            "neighbour_factor": factor,
        }
        info = apply_edit("rome", model, tok, [REQUEST], hp, stats=stats).info
        return info["value_loss"][0], info["value_nll"][0]

    loss, nll = losses(0.0)
    assert loss == nll
    loss, nll = losses(10.0)
    assert loss > nll + 1e-3
    # the position after the target reads the edit through attention: edit layer 0 of 2
    hp = {**ROME_HP, "layer": 0, "kl_factor": 0.0, "neighbour_factor": 0.0}
    for factor in (0.0, 100.0):
        info = apply_edit(
            "rome", *tiny_llama(), [REQUEST], {**hp, "after_factor": factor}, stats=stats
        ).info
        moved = info["value_loss"][0] - info["value_nll"][0]
        assert moved > 1e-3 if factor else moved == 0  # the after-target KL is in the loss
    with pytest.raises(InvalidRequestError, match="neighbour_templates") as bad:
        RomeHparams(neighbour_templates=("no placeholder",))
    assert bad.value.field == "neighbour_templates"


def test_ft_m_stop_at_argmax_stops_once_every_target_token_is_the_argmax() -> None:
    """``stop_at_argmax`` ends training at the first pass where teacher forcing already
    predicts every target token; without it training goes on (the loss is still above
    ``early_stop_loss``), so the stopped edit is the smaller one."""
    target = "Berlin Paris"
    req = EditRequest(prompt=REQUEST.prompt, target_new=target, subject=REQUEST.subject)
    hp = {"layer": 1, "lr": 5e-2, "steps": 30}

    def run(stop: bool) -> tuple[list[float], float, float]:
        model, tok = tiny_llama()
        before = model.get_parameter("model.layers.1.mlp.down_proj.weight").detach().clone()
        delta = apply_edit("ft-m", model, tok, [req], {**hp, "stop_at_argmax": stop})
        after = model.get_parameter("model.layers.1.mlp.down_proj.weight").detach()
        acc = teacher_forced_accuracy(model, tok, [req.prompt], [target])[0]
        return delta.info["losses"], float(acc), float((after - before).norm())

    losses, acc, moved = run(True)
    assert acc == 1.0  # the edit is made ...
    full_losses, full_acc, full_moved = run(False)
    assert full_acc == 1.0
    assert len(losses) < len(full_losses)  # ... in fewer passes
    assert moved < full_moved  # ... with a smaller change


def _ft_m_drift(text: str, hp: dict[str, Any]) -> float:
    """KL divergence of the next-token distribution after ``text`` from the unedited model's,
    after an FT-M edit of ``REQUEST`` with ``hp`` (which must lower the loss)."""
    model, tok = tiny_llama()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits[0, -1].log_softmax(-1)
    delta = apply_edit("ft-m", model, tok, [REQUEST], hp)
    assert delta.info["losses"][-1] < delta.info["losses"][0]
    with torch.no_grad():
        now = model(ids).logits[0, -1].log_softmax(-1)
    return float((now.exp() * (now - ref)).sum())


def test_ft_m_neighbour_term_holds_the_subjects_other_prompts() -> None:
    """FT-M's ``neighbour_factor`` keeps the next-token distribution after a neighbour prompt
    about the subject closer to the unedited model's than FT-M without it does."""
    neighbour = "The sky is blue. Where did {}"  # shares the edited prompt's last tokens
    text = neighbour.format(REQUEST.subject)
    hp = {"layer": 1, "lr": 5e-2, "steps": 10, "neighbour_templates": (neighbour,)}
    plain = _ft_m_drift(text, {**hp, "neighbour_factor": 0.0})
    held = _ft_m_drift(text, {**hp, "neighbour_factor": 50.0})
    assert plain > 1e-3  # without the term FT-M moves the neighbour's distribution ...
    assert held < 0.5 * plain  # ... the neighbour term keeps most of it in place
    with pytest.raises(InvalidRequestError, match="neighbour_templates") as bad:
        FtMHparams(neighbour_templates=("no placeholder",))
    assert bad.value.field == "neighbour_templates"
    # one text from a strategy spec is split at "|"
    two = FtMHparams(neighbour_templates="The gender of {} is|{} works as")
    assert two.neighbour_templates == ("The gender of {} is", "{} works as")
    with pytest.raises(InvalidRequestError, match="neighbour_templates"):
        FtMHparams(neighbour_templates="The gender of {} is|no placeholder")


def test_ft_m_after_term_holds_what_follows_the_target() -> None:
    """FT-M's ``after_factor`` keeps the next-token distribution after ``prompt + target``
    closer to the unedited model's than FT-M without it does (which tends to make the model
    say the new answer again)."""
    text = f"{REQUEST.prompt} {REQUEST.target_new}"
    hp = {"layer": 1, "lr": 5e-2, "steps": 10}
    plain = _ft_m_drift(text, {**hp, "after_factor": 0.0})
    held = _ft_m_drift(text, {**hp, "after_factor": 50.0})
    assert plain > 1e-3
    assert held < 0.5 * plain
    with pytest.raises(InvalidRequestError, match="after_factor") as bad:
        FtMHparams(after_factor=-1.0)
    assert bad.value.field == "after_factor"


def test_ft_l_and_ft_m_take_their_own_measured_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """FT-L and FT-M have separate measured defaults (on SmolLM2-135M: 21 and the 2/3-depth
    fallback, 20); a model without an entry falls back to 2/3 of its depth for both."""
    from memedit.intrinsic import DEFAULT_LAYERS
    from memedit.intrinsic.api import resolve_hparams

    assert DEFAULT_LAYERS[("llama", 30, 576)]["ft-l"] == (21,)
    assert "ft-m" not in DEFAULT_LAYERS[("llama", 30, 576)]
    model, _ = tiny_llama()
    cfg = model.config
    fallback = resolve_hparams("ft-m", None, model).layers
    assert resolve_hparams("ft-l", None, model).layers == fallback
    key = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)
    other = (1 - fallback[0],)
    monkeypatch.setitem(DEFAULT_LAYERS, key, {"ft-l": other})
    assert resolve_hparams("ft-l", None, model).layers == other
    assert resolve_hparams("ft-m", None, model).layers == fallback
