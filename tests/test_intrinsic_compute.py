"""The shared math: token positions, early-stopping capture, kept logits, context prefixes and the
float64 solves ROME and MEMIT are built on."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch

from memedit.errors import InvalidRequestError
from memedit.hooks import edit_output, trace
from memedit.intrinsic.compute import (
    capture,
    encode,
    forward_logits,
    least_squares_update,
    mlp_out_name,
    rank_one_update,
    solve_psd,
    subject_keys,
    subject_token_index,
    target_batch,
)
from memedit.intrinsic.values import context_prefixes
from memedit.types import EditRequest

from .tiny import tiny_llama, tiny_tokenizer
from .tiny_models import TYPES, tiny_model


def test_subject_token_index_is_the_subjects_last_token() -> None:
    tok = tiny_tokenizer()
    text = "Where did Leo Arons die?"
    start = text.index("Leo Arons")
    idx = subject_token_index(tok, text, start, start + len("Leo Arons"))
    tokens = tok.convert_ids_to_tokens(encode(tok, text))
    assert tokens[idx] == "ĠArons" and tokens[idx + 1] != "ĠArons"


def test_subject_token_index_without_offsets_counts_the_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = tiny_tokenizer()
    text = "Where did Leo Arons die?"
    start = text.index("Leo Arons")
    fast = subject_token_index(tok, text, start, start + 9)
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    assert subject_token_index(tok, text, start, start + 9) == fast
    with pytest.raises(InvalidRequestError, match="subject span"):
        subject_token_index(tok, text, 5, 99)


def test_capture_stops_after_the_module() -> None:
    model, tok = tiny_llama()
    ids = torch.tensor([encode(tok, "The sky is blue.")])
    ran: list[str] = []
    handle = model.model.layers[1].register_forward_hook(lambda *a: ran.append("layer1"))
    try:
        k, v = capture(model, "model.layers.0.mlp.down_proj", ids, torch.ones_like(ids))
    finally:
        handle.remove()
    assert ran == [] and k.shape == (1, ids.shape[1], 128) and v.shape == (1, ids.shape[1], 64)
    with trace(model, ["model.layers.0.mlp.down_proj"], inputs=True) as tr:
        model(input_ids=ids)
    assert torch.equal(tr.inputs["model.layers.0.mlp.down_proj"], k)


@pytest.mark.parametrize("model_type", TYPES)
def test_kept_logits_and_capture_work_on_every_registered_architecture(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, 2] = True
    keep[1, :4] = True
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(forward_logits(model, ids, mask, keep), full[keep])
    keys, out = capture(model, mlp_out_name(model, 1), ids, mask)
    assert keys.shape[:2] == out.shape[:2] == (2, 7) and out.shape[2] == 64


def test_forward_logits_keeps_exactly_the_marked_positions() -> None:
    model, tok = tiny_llama()
    batch = target_batch(tok, [("The sky is", "blue"), ("Where did Leo Arons", "die ?")], "cpu")
    kept = forward_logits(model, batch.ids, batch.mask, batch.keep)
    with torch.no_grad():
        full = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    torch.testing.assert_close(kept, full[batch.keep])
    # the positions predict the target tokens: prompt length - 1 onwards
    first = len(encode(tok, "Where did Leo Arons"))
    assert batch.keep[1].nonzero().flatten().tolist()[0] == first - 1
    nll = batch.nll(kept.log_softmax(-1))
    assert nll.shape == (2,) and bool((nll > 0).all())


def test_target_batch_after_keeps_each_rows_last_position_too() -> None:
    """``after=True`` adds the position after each target to the kept logits without moving
    the target positions' scores."""
    model, tok = tiny_llama()
    pairs = [("The sky is", "blue"), ("Where did Leo Arons", "die ?")]
    plain = target_batch(tok, pairs, "cpu")
    batch = target_batch(tok, pairs, "cpu", after=True)
    assert plain.after_index is None and batch.after_index is not None
    kept = forward_logits(model, batch.ids, batch.mask, batch.keep)
    with torch.no_grad():
        full = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    lengths = batch.mask.sum(dim=1)
    for i in range(2):
        torch.testing.assert_close(kept[batch.after_index[i]], full[i, lengths[i] - 1])
    plain_kept = forward_logits(model, plain.ids, plain.mask, plain.keep)
    torch.testing.assert_close(
        batch.nll(kept.log_softmax(-1)), plain.nll(plain_kept.log_softmax(-1))
    )


def test_subject_keys_average_over_prefixes_and_keep_the_bare_prompt() -> None:
    model, tok = tiny_llama()
    req = EditRequest(prompt="Where did Leo Arons die?", target_new="Berlin", subject="Leo Arons")
    keys = subject_keys(model, tok, 1, [req], ["", "The sky is blue. "])
    bare = subject_keys(model, tok, 1, [req], [""])
    # (batched with a longer row, the bare prompt's numbers may differ in the last bits)
    torch.testing.assert_close(keys.clean, bare.mean)
    torch.testing.assert_close(keys.clean_out, bare.clean_out)
    assert not torch.equal(keys.mean, keys.clean)


def test_context_prefixes_are_sampled_once_with_a_fixed_seed() -> None:
    model, tok = tiny_llama()
    first = context_prefixes(model, tok, 3, 4, seed=0)
    assert first[0] == "" and len(first) == 4
    assert all(p.endswith(". ") for p in first[1:])
    assert context_prefixes(model, tok, 3, 4, seed=0) is first  # cached per model
    other, _ = tiny_llama()
    assert context_prefixes(other, tok, 3, 4, seed=0) == first  # same seed, same text


def test_rank_one_update_inserts_the_value_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    cov = x.T @ x / 200
    k_bar, k = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    r = torch.randn(6, generator=gen)
    delta = rank_one_update(k_bar, k, r, cov)
    assert delta.dtype == torch.float64 and delta.shape == (6, 10)
    torch.testing.assert_close((w + delta) @ k.double(), w @ k.double() + r.double())
    # the change lies along C⁻¹ k̄ (rank one)
    assert float(torch.linalg.svdvals(delta)[1]) < 1e-10


def test_least_squares_update_solves_memits_normal_equations() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 10, generator=gen)
    res = torch.randn(3, 6, generator=gen)
    exact = least_squares_update(keys, res)  # no covariance: interpolates every key
    torch.testing.assert_close(exact @ keys.double().T, res.double().T)
    x = torch.randn(100, 10, generator=gen, dtype=torch.float64)
    cov = 5.0 * x.T @ x / 100
    delta = least_squares_update(keys, res, cov)
    k, r = keys.double(), res.double()
    # the minimiser of ||Δ Kᵀ - Rᵀ||² + tr(Δ C Δᵀ): gradient zero
    grad = (delta @ k.T - r.T) @ k + delta @ cov
    assert float(grad.abs().max()) < 1e-9


def test_solve_psd_handles_a_singular_matrix() -> None:
    v = torch.randn(8, 1, dtype=torch.float64)
    a = v @ v.T  # rank one
    x = solve_psd(a, v[:, 0])
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(a @ x, v[:, 0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2"])
@pytest.mark.parametrize("subject_first", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_prefix_cache_gives_the_same_value_as_full_passes(
    arch: str, subject_first: bool, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached run feeds far fewer tokens through the model and reaches the same value —
    also when the subject is the very first token (nothing to cache for that row) — in the
    packed layout (sdpa, eager attention) and in the padded one (any other attention)."""
    from memedit.intrinsic import RomeHparams, values
    from memedit.intrinsic.compute import lookup_index, mlp_out_name
    from memedit.intrinsic.values import optimise_value

    from .test_intrinsic_methods import BUILDERS

    model, tok = BUILDERS[arch]()
    assert values._takes_custom_mask(model)  # every test architecture runs sdpa or eager
    if not packed:
        monkeypatch.setattr(values, "_takes_custom_mask", lambda _model: False)
    req = EditRequest(
        prompt="The sky is blue. Where did Leo Arons die ?",
        target_new="Berlin",
        subject="Leo Arons",
    )
    if subject_first:
        req = EditRequest(prompt="The capital of France is", target_new="Paris", subject="The")
        assert lookup_index(tok, "", req) == 0
    prefixes = ("", "The capital of France is Paris. ", "Q: A: ")
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    seen: list[int] = []  # tokens through the embedding, per run

    def count(out: torch.Tensor) -> torch.Tensor:
        seen[-1] += out.shape[0] * out.shape[1]
        return out

    # without neighbour prompts (the savings bound is about the context prefixes), then with
    # RomeHparams' default ones (rows whose subject comes first save nothing, but must agree)
    for neighbours in ((), RomeHparams().neighbour_templates):
        results = []
        for use_cache in (False, True):
            seen.append(0)
            hp = RomeHparams(
                v_steps=6,
                prefix_cache=use_cache,
                clamp_norm_factor=50.0,
                neighbour_templates=neighbours,
            )
            with edit_output(model, emb_name, count):
                results.append(
                    optimise_value(model, tok, req, mlp_out_name(model, 0), prefixes, hp)
                )
        plain, cached = results
        if not neighbours:
            assert seen[-1] < (0.8 if subject_first else 0.6) * seen[-2]
        assert seen[-1] < seen[-2]
        assert plain.steps == cached.steps == 6
        torch.testing.assert_close(cached.init, plain.init, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cached.target, plain.target, rtol=1e-3, atol=1e-5)
        assert abs(cached.loss - plain.loss) < 1e-3
        assert abs(cached.nll - plain.nll) < 1e-3


def test_packed_rows_feed_fewer_tokens_than_padded_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing drops the padding of short rows (the neighbour prompts) and every token after
    a row's last scored one, and reaches the same value as the padded layout."""
    from memedit.intrinsic import RomeHparams, values
    from memedit.intrinsic.compute import mlp_out_name
    from memedit.intrinsic.values import optimise_value

    from .test_intrinsic_methods import BUILDERS

    model, tok = BUILDERS["llama"]()
    req = EditRequest(
        prompt="Where did Leo Arons die in the end ?", target_new="Berlin", subject="Leo Arons"
    )
    hp = RomeHparams(v_steps=5, clamp_norm_factor=50.0)
    emb = model.get_input_embeddings()
    seen: list[int] = []

    def count(_m: torch.nn.Module, _a: Any, out: torch.Tensor) -> None:
        seen[-1] += out.shape[0] * out.shape[1]

    results = []
    handle = emb.register_forward_hook(count)
    try:
        for packed in (True, False):
            seen.append(0)
            monkeypatch.setattr(values, "_takes_custom_mask", lambda _m, p=packed: p)
            prefixes = ("", "The sky is blue. ", "Q: A: ")
            results.append(optimise_value(model, tok, req, mlp_out_name(model, 0), prefixes, hp))
    finally:
        handle.remove()
    packed_run, padded_run = results
    assert seen[0] < 0.8 * seen[1], seen
    assert packed_run.steps == padded_run.steps == 5
    torch.testing.assert_close(packed_run.target, padded_run.target, rtol=1e-3, atol=1e-5)
    assert abs(packed_run.nll - padded_run.nll) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_values_match_one_request_at_a_time(
    arch: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MEMIT optimises every request's value in one pass: each must come out as it does alone,
    also when requests stop at different steps and leave the pass (chunks of 2 of 3)."""
    from memedit.intrinsic import MemitHparams
    from memedit.intrinsic.compute import mlp_out_name
    from memedit.intrinsic.values import optimise_value, optimise_values

    from .test_intrinsic_methods import BUILDERS

    model, tok = BUILDERS[arch]()
    reqs = [
        EditRequest(prompt="Where did Leo Arons die ?", target_new="Berlin", subject="Leo Arons"),
        EditRequest(prompt="The capital of France is", target_new="Rome city", subject="France"),
        EditRequest(
            prompt="In which language did Mary Ann write her long books ?",
            target_new="Dutch",
            subject="Mary Ann",
        ),
    ]
    prefixes = ("", "The sky is blue. ", "Q: A: ")
    module = mlp_out_name(model, 0)
    probe = MemitHparams(
        v_steps=8,
        early_stop_loss=0.0,
        clamp_norm_factor=50.0,
        neighbour_templates=("The type of {} is",),
        neighbour_factor=0.5,
    )
    with caplog.at_level(logging.DEBUG, logger="memedit.intrinsic.values"):
        optimise_values(model, tok, reqs, module, prefixes, probe)
    seen: dict[int, list[float]] = {}  # each request's nll before each pass's update
    for rec in caplog.records:
        if rec.msg.startswith("value %d step"):
            seen.setdefault(int(rec.args[0]), []).append(float(rec.args[3]))  # type: ignore[index]
    lows = sorted(min(nlls[:-1]) for nlls in seen.values())
    assert lows[-1] - lows[0] > 1e-3
    # a threshold that one request reaches before the last pass and another never does
    hp = dataclasses.replace(probe, early_stop_loss=(lows[0] + lows[-1]) / 2)
    alone = [optimise_value(model, tok, r, module, prefixes, hp) for r in reqs]
    together = optimise_values(model, tok, reqs, module, prefixes, hp, chunk=2)
    assert len({v.steps for v in alone}) > 1, [v.steps for v in alone]
    for a, b in zip(alone, together, strict=True):
        assert a.steps == b.steps
        torch.testing.assert_close(b.init, a.init, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.target, a.target, rtol=1e-3, atol=1e-5)
        assert abs(a.loss - b.loss) < 1e-3
        assert abs(a.nll - b.nll) < 1e-3
    with pytest.raises(InvalidRequestError, match="chunk"):
        optimise_values(model, tok, reqs, module, prefixes, hp, chunk=0)


def test_target_batch_hits_mark_pairs_whose_every_target_token_is_the_argmax() -> None:
    from memedit.intrinsic.compute import TargetBatch

    # two pairs: row 0 scores tokens 3, 1 at kept positions 0, 1; row 1 scores token 2 at 2
    batch = TargetBatch(
        ids=torch.zeros(2, 3, dtype=torch.long),
        mask=torch.ones(2, 3, dtype=torch.long),
        keep=torch.ones(2, 3, dtype=torch.bool),
        flat=torch.arange(6).reshape(2, 3),
        tgt_index=torch.tensor([0, 1, 2]),
        tgt_token=torch.tensor([3, 1, 2]),
        tgt_row=torch.tensor([0, 0, 1]),
        counts=torch.tensor([2.0, 1.0]),
        n_pairs=2,
    )
    logp = torch.full((3, 4), -5.0)
    logp[0, 3] = logp[1, 1] = logp[2, 0] = -0.1  # pair 0 right twice, pair 1 wrong
    assert batch.hits(logp).tolist() == [True, False]
    logp[1, 2] = 0.0  # pair 0's second token now loses to token 2
    logp[2, 2] = 0.0
    assert batch.hits(logp).tolist() == [False, True]


def test_stop_at_argmax_ends_the_value_where_the_edit_first_holds() -> None:
    """With ``stop_at_argmax`` the value stops at the first pass whose every prefixed prompt
    already gives every target token as the argmax: the same trajectory as a plain run cut
    at that many passes, where the target holds after every prefix and one pass earlier
    it did not."""
    from memedit.intrinsic import RomeHparams
    from memedit.intrinsic.compute import forward_logits, lookup_index, mlp_out_name, target_batch
    from memedit.intrinsic.values import optimise_value

    replace = dataclasses.replace
    model, tok = tiny_llama()
    req = EditRequest(
        prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
    )
    prefixes = ("", "The sky is blue. ", "Q: A: ")
    module = mlp_out_name(model, 0)
    # small Adam steps, so the edit takes several passes to hold (the clamp never binds)
    base = RomeHparams(
        v_steps=40, v_lr=0.003, v_weight_decay=0.0, early_stop_loss=0.0,
        clamp_norm_factor=100.0, kl_factor=0.0,
    )  # fmt: skip
    stopped = optimise_value(model, tok, req, module, prefixes, replace(base, stop_at_argmax=True))
    assert 2 < stopped.steps < base.v_steps
    assert stopped.nll > base.early_stop_loss

    def holds(value: torch.Tensor) -> bool:
        delta = value - stopped.init
        batch = target_batch(tok, [(p + req.prompt, req.target_new) for p in prefixes], "cpu")
        cols = [lookup_index(tok, p, req) for p in prefixes]

        def put(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for row, col in enumerate(cols):
                out[row, col] += delta
            return out

        with torch.no_grad(), edit_output(model, module, put):
            logits = forward_logits(model, batch.ids, batch.mask, batch.keep)
        return bool(batch.hits(logits.float()).all())

    # Adam's trajectory does not depend on when it stops: a plain run of the same passes ends
    # on the same value; the value it holds one pass earlier does not yet make the edit.
    same = optimise_value(model, tok, req, module, prefixes, replace(base, v_steps=stopped.steps))
    torch.testing.assert_close(same.target, stopped.target)
    earlier = optimise_value(
        model, tok, req, module, prefixes, replace(base, v_steps=stopped.steps - 1)
    )
    assert holds(stopped.target)
    assert not holds(earlier.target)


def test_values_from_a_bfloat16_copy_start_from_the_models_own_output() -> None:
    """``value_dtype="bfloat16"`` optimises on a bf16 copy: the model is left as it was, the
    value's ``init`` is the fp32 model's own output at the lookup token (so a solve sees no
    cast error), and the change found is close to the one the fp32 passes find."""
    from memedit.intrinsic import RomeHparams
    from memedit.intrinsic.compute import lookup_outputs, mlp_out_name
    from memedit.intrinsic.values import optimise_value

    model, tok = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = EditRequest(
        prompt="The sky is blue. Where did Leo Arons", target_new="Paris", subject="Leo Arons"
    )
    prefixes = ("", "Q: A: ")
    module = mlp_out_name(model, 0)
    hp = RomeHparams(v_steps=6, v_lr=0.003, v_weight_decay=0.0, clamp_norm_factor=100.0)
    full = optimise_value(model, tok, req, module, prefixes, hp)
    half = optimise_value(
        model, tok, req, module, prefixes, dataclasses.replace(hp, value_dtype="bfloat16")
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    exact = lookup_outputs(model, tok, module, [req])[0]
    assert torch.equal(half.init, exact)
    torch.testing.assert_close(full.init, exact, rtol=1e-4, atol=1e-6)
    change_full, change_half = full.target - full.init, half.target - half.init
    assert float(change_full.norm()) > 0
    cos = torch.nn.functional.cosine_similarity(change_full, change_half, dim=0)
    assert float(cos) > 0.9, float(cos)
    assert half.steps == full.steps == hp.v_steps
    same = optimise_value(
        model, tok, req, module, prefixes, dataclasses.replace(hp, value_dtype="float32")
    )
    torch.testing.assert_close(same.target, full.target)
    with pytest.raises(InvalidRequestError, match="value_dtype"):
        RomeHparams(value_dtype="int8")
