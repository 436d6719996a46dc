"""The two shortcuts of a value pass, on tiny random models: attention row by row (the packed
layout's mask without the pairs it masks away) gives the dense masked attention's result,
Gemma 2's logit cap and a sliding window included; the blocks below the edited one run once
per layout and are replayed after, with the model's blocks and attention setting put back
(also after an exception); and a whole value optimisation with both reaches the value it
reaches without them."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from memedit.intrinsic import MemitHparams, RomeHparams
from memedit.intrinsic.compute import block_name, mlp_out_name
from memedit.intrinsic.layer_cache import BelowCache, block_index
from memedit.intrinsic.row_attention import _attention, row_attention, row_plan
from memedit.types import EditRequest

from .test_intrinsic_methods import BUILDERS


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sees: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Reference: masked attention over the whole packed sequence, (1, q, heads, dim)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~sees, float("-inf")), dim=-1)
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize(("softcap", "window"), [(None, None), (2.0, None), (None, 3)])
def test_row_attention_is_the_dense_masked_attention(
    softcap: float | None, window: int | None
) -> None:
    """Rows of new tokens after a cache of each row's first tokens (one row with none), in
    a shuffled row order against the cache's, as a value pass lays them out."""
    gen = torch.Generator().manual_seed(0)
    cached = {10: 4, 11: 0, 12: 6, 13: 2}  # row id -> cached tokens (contiguous, in this order)
    new = [(12, 3), (10, 5), (13, 1), (11, 4)]  # (row id, new tokens), the pass's order
    cache_rows = torch.tensor([r for r, n in cached.items() for _ in range(n)])
    n_cached, n_new = len(cache_rows), sum(n for _, n in new)
    new_rows = torch.tensor([r for r, n in new for _ in range(n)])
    position = {  # a token's position in its own row
        "cached": [j for _, n in cached.items() for j in range(n)],
        "new": [cached[r] + j for r, n in new for j in range(n)],
    }
    q_pos = torch.tensor(position["new"])
    k_pos = torch.tensor(position["cached"] + position["new"])
    k_rows = torch.cat([cache_rows, new_rows])
    idx = torch.arange(n_new)
    sees = (new_rows[:, None] == k_rows[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    sees[:, n_cached:] &= idx[None, :] <= idx[:, None]
    if window is not None:
        sees &= (q_pos[:, None] - k_pos[None, :]) < window
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(1, heads, n_new, dim, generator=gen) * 3
    k = torch.randn(1, kv_heads, n_cached + n_new, dim, generator=gen) * 3
    v = torch.randn(1, kv_heads, n_cached + n_new, dim, generator=gen)
    want = _dense(q, k, v, sees[None, None], dim**-0.5, softcap)

    plan = row_plan([n for _, n in new], [r for r, _ in new], cache_rows, torch.device("cpu"))
    assert plan.n_queries == n_new and plan.n_keys == n_cached + n_new
    model = torch.nn.Module()
    model.config = type("C", (), {"_attn_implementation": "sdpa"})()  # type: ignore[assignment]
    with row_attention(model, plan):
        assert model.config._attn_implementation == "memedit_rows"
        got, _ = _attention(
            model, q, k, v, None, scaling=dim**-0.5, softcap=softcap, sliding_window=window
        )
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if softcap is not None:  # the cap matters at this scale: without it the result differs
        plain = _dense(q, k, v, sees[None, None], dim**-0.5, None)
        assert not torch.allclose(got, plain, atol=1e-3)


def test_the_attention_setting_is_put_back_after_an_exception() -> None:
    model, _tok = BUILDERS["llama"]()
    plan = row_plan([2], [0], None, torch.device("cpu"))
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="midway"), row_attention(model, plan):
        raise RuntimeError("midway")
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_calls_of_another_shape_run_the_replaced_attention(arch: str) -> None:
    """A forward that is not the planned pass (the whole model on other tokens), or one from
    another thread, which sees no plan, runs as it would without the plan, bit for bit: sdpa
    for Llama, Gemma 2's own capped eager attention for Gemma 2."""
    import threading

    model, tok = BUILDERS[arch]()
    if arch == "gemma2":  # logits large enough for the cap (which sdpa would ignore) to act
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    param.mul_(30.0)
        for sub in model.modules():
            if hasattr(sub, "attn_logit_softcapping"):
                sub.attn_logit_softcapping = 0.5
    ids = tok("Where did Leo Arons die ?", return_tensors="pt").input_ids
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with row_attention(model, row_plan([3, 2], [0, 1], None, torch.device("cpu"))):
            got = model(input_ids=ids).logits
            thread = threading.Thread(target=lambda: seen.append(model(input_ids=ids).logits))
            thread.start()
            thread.join()
    assert torch.equal(got, want)
    assert torch.equal(seen[0], want)


def test_gemma2s_capped_attention_gives_the_same_pass_row_by_row() -> None:
    """A value pass's logits and its gradient at the edited output, with Gemma 2's logit cap
    set low enough to act on a random model (its eager attention is the reference)."""
    from memedit.hooks import edit_output
    from memedit.intrinsic import values
    from memedit.intrinsic.compute import forward_logits

    model, tok = BUILDERS["gemma2"]()
    with torch.no_grad():  # attention logits large enough for a cap to act on
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(30.0)
    req = EditRequest(prompt="Where did Leo Arons die ?", target_new="Berlin", subject="Leo Arons")
    hp = MemitHparams(neighbour_templates=("The type of {} is",), neighbour_factor=0.5)
    plans = [values._plan(tok, req, ("", "Q: A: "), hp)]
    rows = values._layout(model, tok, plans, [0], hp).rows
    assert rows.plan is not None
    module = mlp_out_name(model, 1)

    def run(rowwise: bool, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
        for sub in model.modules():
            if hasattr(sub, "attn_logit_softcapping"):
                sub.attn_logit_softcapping = cap
        delta = torch.zeros(model.config.hidden_size, requires_grad=True)

        def add(out: torch.Tensor) -> torch.Tensor:
            return out.index_put(
                (rows.index, rows.cols), delta.expand(len(rows.cols), -1), accumulate=True
            )

        past = copy.deepcopy(rows.past)
        plan = rows.plan
        assert plan is not None
        with (
            edit_output(model, module, add),
            row_attention(model, plan) if rowwise else nullcontext(),
        ):
            logits = forward_logits(
                model, rows.ids, rows.mask, rows.keep, past, position_ids=rows.positions
            )
        loss = logits.float().log_softmax(-1)[:, 5].sum()
        return logits.detach(), torch.autograd.grad(loss, delta)[0]

    want, want_grad = run(False, 0.5)
    got, got_grad = run(True, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
    uncapped, _ = run(True, 50.0)
    assert not torch.allclose(uncapped, got, atol=1e-4)  # the cap acted


def test_blocks_below_the_edit_run_once_per_layout_and_are_put_back() -> None:
    model, tok = BUILDERS["llama"]()
    assert block_index(model, mlp_out_name(model, 1)) == 1
    assert block_index(model, block_name(model, 1)) == 1
    assert block_index(model, "lm_head") is None
    blocks = model.get_submodule("model.layers")
    originals = list(blocks)
    calls: list[int] = []
    handle = originals[0].register_forward_hook(lambda *_: calls.append(0))
    below = BelowCache(model, mlp_out_name(model, 1))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    layout, other = object(), object()
    try:
        with torch.no_grad():
            with below.run(layout):
                first = model(input_ids=ids).logits
            with below.run(layout):
                again = model(input_ids=ids).logits
            assert len(calls) == 1  # the second pass did not run block 0
            assert torch.equal(again, first)
            assert list(blocks) == originals
            with pytest.raises(RuntimeError, match="midway"), below.run(layout):
                raise RuntimeError("midway")
            assert list(blocks) == originals
            with below.run(other):  # a new layout is recorded afresh
                model(input_ids=ids[:, :3])
            assert len(calls) == 2 and below.owner is other
    finally:
        handle.remove()
    # an edit in block 0 has nothing below it to keep
    assert BelowCache(model, mlp_out_name(model, 0)).count == 0


def _three_layers(model_type: str) -> tuple[Any, Any]:
    """A 3-layer random model: an edit in block 1 has block 0 below it and block 2 above to
    carry it from the subject to the target's positions."""
    import transformers as T

    from .tiny import tiny_tokenizer
    from .tiny_models import _DECODER

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    if model_type == "gpt2":
        config: Any = T.GPT2Config(
            vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    else:
        fields = {**_DECODER, "vocab_size": len(tok), "num_hidden_layers": 3}
        config = T.AutoConfig.for_model(model_type, **fields)
    return T.AutoModelForCausalLM.from_config(config).eval(), tok


# Gemma 2's random model predicts a flat distribution whatever the value (its NLL does not
# move in a few steps), so Adam would turn rounding noise into full steps; its pass and
# gradient are compared directly above.
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_a_value_with_both_shortcuts_is_the_value_without_them(
    arch: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """MEMIT's batched values at block 1's MLP output (block 0 below it kept), three requests
    in chunks of two so that one layout follows another, against full dense passes."""
    from memedit.intrinsic import layer_cache, values

    model, tok = _three_layers(arch)
    reqs = [
        EditRequest(prompt="Where did Leo Arons die ?", target_new="Berlin", subject="Leo Arons"),
        EditRequest(prompt="The capital of France is", target_new="Rome city", subject="France"),
        EditRequest(prompt="Which tongue did Mary Ann speak ?", target_new="Dutch", subject="Mary"),
    ]
    prefixes = ("", "The sky is blue. ", "Q: A: ")
    hp: Any = MemitHparams(  # a random model's logits are small: let the value grow
        v_steps=6,
        early_stop_loss=0.0,
        clamp_norm_factor=100.0,
        v_weight_decay=0.0,
        neighbour_templates=("The type of {} is",),
        neighbour_factor=0.5,
    )
    module = mlp_out_name(model, 1)
    used: list[int] = []
    real_plan = values.row_plan

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        used.append(1)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(values, "row_plan", counting_plan)
    fast = values.optimise_values(model, tok, reqs, module, prefixes, hp, chunk=2)
    assert used, "the packed layout did not plan its rows"
    monkeypatch.setattr(values, "supports_row_attention", lambda _m: False)
    monkeypatch.setattr(layer_cache.BelowCache, "run", lambda _self, _owner: nullcontext())
    with caplog.at_level(logging.DEBUG, logger="memedit.intrinsic.values"):
        full = values.optimise_values(model, tok, reqs, module, prefixes, hp, chunk=2)
    first = {  # each request's NLL before its first update: the values must have moved it
        int(r.args[0]): float(r.args[3])  # type: ignore[index]
        for r in caplog.records
        if r.msg.startswith("value %d step") and r.args[1] == 0  # type: ignore[index]
    }
    assert all(v.nll < first[i] - 1e-3 for i, v in enumerate(full)), (first, full)
    for a, b in zip(fast, full, strict=True):
        assert a.steps == b.steps
        torch.testing.assert_close(a.init, b.init, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.target, b.target, rtol=1e-4, atol=1e-5)
        assert math.isclose(a.nll, b.nll, rel_tol=1e-4, abs_tol=1e-5)
    # and ROME's single value, the bare prompt and neighbour rows included
    rome = RomeHparams(v_steps=4, clamp_norm_factor=50.0)
    one = values.optimise_value(model, tok, reqs[0], module, prefixes, rome)
    monkeypatch.undo()
    other = values.optimise_value(model, tok, reqs[0], module, prefixes, dataclasses.replace(rome))
    torch.testing.assert_close(one.target, other.target, rtol=1e-4, atol=1e-5)


def _traces(caplog: pytest.LogCaptureFixture) -> dict[int, list[tuple[float, bool]]]:
    """Each request's logged (NLL, on its bare prompt only) per pass, in order."""
    out: dict[int, list[tuple[float, bool]]] = {}
    for r in caplog.records:
        if r.msg.startswith("value %d step"):
            args: Any = r.args
            out.setdefault(int(args[0]), []).append((float(args[3]), args[4] == " (bare)"))
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_bare_until_runs_the_bare_prompt_alone_until_its_nll_falls_below_it(
    packed: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While on its bare prompt a value follows the path it has with no prefixes at all (same
    loss, same Adam state); from the pass after its bare NLL falls below ``bare_until`` every
    prefixed prompt is in its loss, in the packed layout (the cached head reused) as in the
    padded one, whose values agree."""
    from memedit.intrinsic import layer_cache, values

    model, tok = _three_layers("llama")
    reqs = [
        EditRequest(prompt="Where did Leo Arons die ?", target_new="Berlin", subject="Leo Arons"),
        EditRequest(prompt="The capital of France is", target_new="Rome city", subject="France"),
        EditRequest(prompt="Which tongue did Mary Ann speak ?", target_new="Dutch", subject="Mary"),
    ]
    prefixes = ("", "The sky is blue. ", "Q: A: ")
    hp: Any = MemitHparams(  # no decay: the NLL falls monotonically
        v_steps=8, early_stop_loss=0.0, clamp_norm_factor=100.0, v_weight_decay=0.0, v_lr=0.5
    )
    module = mlp_out_name(model, 1)
    if not packed:
        monkeypatch.setattr(values, "_takes_custom_mask", lambda _m: False)
    with caplog.at_level(logging.DEBUG, logger="memedit.intrinsic.values"):
        values.optimise_values(model, tok, reqs, module, ("",), hp, chunk=2)
    alone = {i: [nll for nll, _ in t] for i, t in _traces(caplog).items()}
    assert all(a[3] < a[0] - 1e-3 for a in alone.values()), alone  # the bare NLL falls
    cut = sorted(a[2] for a in alone.values())[1]  # one request joins at pass 2 or earlier
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="memedit.intrinsic.values"):
        found = values.optimise_values(
            model, tok, reqs, module, prefixes, dataclasses.replace(hp, bare_until=cut), chunk=2
        )
    joined_by_pass_2 = 0
    for i, trace in _traces(caplog).items():
        n_bare = next((s + 1 for s, (nll, _) in enumerate(trace) if nll < cut), 8)
        assert [on_bare for _, on_bare in trace] == [True] * n_bare + [False] * (8 - n_bare)
        for (nll, _), ref in zip(trace[:n_bare], alone[i], strict=False):
            assert math.isclose(nll, ref, rel_tol=1e-4, abs_tol=1e-5), (i, trace, alone[i])
        joined_by_pass_2 += n_bare <= 3
        assert found[i].steps == 8
    assert 1 <= joined_by_pass_2 < 3  # some requests joined while others stayed bare
    if packed:  # the padded layout, which makes its own cache, finds the same values
        monkeypatch.setattr(values, "_takes_custom_mask", lambda _m: False)
        monkeypatch.setattr(layer_cache.BelowCache, "run", lambda _self, _owner: nullcontext())
        padded = values.optimise_values(
            model, tok, reqs, module, prefixes, dataclasses.replace(hp, bare_until=cut), chunk=2
        )
        for a, b in zip(found, padded, strict=True):
            torch.testing.assert_close(a.target, b.target, rtol=1e-4, atol=1e-5)
            assert math.isclose(a.nll, b.nll, rel_tol=1e-4, abs_tol=1e-5)


def test_bare_until_must_be_a_non_negative_number() -> None:
    from memedit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="bare_until"):
        MemitHparams(bare_until=-0.5)
