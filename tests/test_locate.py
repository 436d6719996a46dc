"""Causal tracing on tiny random models: exact identities, hook hygiene, grouping, choice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from memedit.locate import GROUPS, TraceConfig, group_positions, recommend, trace_fact
from memedit.spec import ensure_spec as model_spec
from tests.tiny import tiny_llama

PROMPT, SUBJECT = "The place of death of Leo Arons is", "Leo Arons"


def test_zero_noise_restoration_equals_clean_probability() -> None:
    model, tok = tiny_llama()
    ft = trace_fact(model, tok, PROMPT, SUBJECT, 5, TraceConfig(noise=0.0, samples=2))
    assert ft.p_corrupt == pytest.approx(ft.p_clean, abs=1e-6)
    for table in ft.restored.values():
        for row in table:
            assert row == pytest.approx([ft.p_clean] * len(row), abs=1e-6)


def test_noise_changes_answer_probability_and_last_layer_restores_it() -> None:
    model, tok = tiny_llama()
    ft = trace_fact(model, tok, PROMPT, SUBJECT, 5, TraceConfig(noise=5.0, samples=2))
    assert ft.p_corrupt != pytest.approx(ft.p_clean, abs=1e-6)
    # restoring the last layer's residual at the last token gives back the clean output
    assert ft.restored["hidden"][-1][-1] == pytest.approx(ft.p_clean, rel=1e-4)


def test_fast_path_gives_the_effects_of_full_forward_passes() -> None:
    # 6 layers, a 3-layer window, small batches and a narrow spread: every shortcut of the
    # fast path (layer skipping, prefix cache, mixed first layers, chunking) is exercised
    model, tok = tiny_llama(seed=1, layers=6)
    config = TraceConfig(noise=3.0, samples=2, window=3, chunk=6, spread=2)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    answer = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    fast = trace_fact(model, tok, PROMPT, SUBJECT, answer, config)
    slow = trace_fact(model, tok, PROMPT, SUBJECT, answer, config, fast=False)
    assert fast.subject[0] > 0  # a position before the subject is part of the check
    assert fast.p_corrupt == pytest.approx(slow.p_corrupt, abs=1e-7)
    assert fast.p_corrupt != pytest.approx(fast.p_clean, abs=1e-5)
    for c in config.components:
        a, b = torch.tensor(fast.restored[c]), torch.tensor(slow.restored[c])
        assert a.shape == (len(fast.tokens), 6)
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-5), (c, (a - b).abs().max())
    # the check is not vacuous: restorations move the (near-uniform) probability by far more
    # than the tolerance (p_corrupt is about 4e-3 on this random model)
    assert max(abs(v - slow.p_corrupt) for row in slow.restored["hidden"] for v in row) > 1e-4


def test_fast_path_falls_back_when_a_shortened_run_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from contextlib import contextmanager

    from memedit.locate import trace as trace_mod

    @contextmanager
    def broken(*_args: object, **_kwargs: object) -> Iterator[None]:
        yield  # enters nothing: the run starts from the embeddings without noise

    model, tok = tiny_llama(seed=1, layers=4)
    config = TraceConfig(noise=3.0, samples=1, window=2)
    slow = trace_fact(model, tok, PROMPT, SUBJECT, 5, config, fast=False)
    monkeypatch.setattr(trace_mod, "run_from", broken)
    fell_back = trace_fact(model, tok, PROMPT, SUBJECT, 5, config)
    assert fell_back.restored == slow.restored


def test_no_layer_or_hook_left_behind_when_a_fast_run_raises() -> None:
    from memedit.locate.stream import run_from

    model, _ = tiny_llama(layers=4)
    layers = list(model.model.layers)
    state = torch.zeros(1, 3, 64)
    with pytest.raises(RuntimeError), run_from(model, model_spec(model), 2, 4, state):
        assert model.model.layers[0] is not layers[0]
        raise RuntimeError
    assert list(model.model.layers) == layers
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_no_hook_left_behind_after_an_exception() -> None:
    model, tok = tiny_llama()
    with pytest.raises(IndexError):
        trace_fact(model, tok, PROMPT, SUBJECT, 10**6, TraceConfig(noise=1.0, samples=1))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_group_positions() -> None:
    groups = group_positions(8, (1, 4))
    assert groups == [
        "before subject",
        "first subject token",
        "middle subject tokens",
        "last subject token",
        "first subsequent token",
        "further tokens",
        "further tokens",
        "last token",
    ]


def test_recommend_picks_argmax_of_a_hand_made_table() -> None:
    row = [0.0, 0.1, 0.05, 0.2, 0.9, 0.3, 0.0, 0.0]
    effects = {"mlp": {g: [0.0] * 8 for g in GROUPS}}
    effects["mlp"]["last subject token"] = row
    rec = recommend(effects, width=3)
    assert rec["rome_layer"] == 4
    assert rec["memit_layers"] == [3, 4, 5]


def test_an_interrupted_run_resumes_only_with_the_same_model_and_settings(tmp_path: Path) -> None:
    from memedit.locate.run import _resume

    path = tmp_path / "facts.partial.jsonl"
    run = {"model": "smollm2-135m", "config": {"noise": 0.1, "samples": 1}}
    assert _resume(path, run) == {}
    with path.open("a", encoding="utf-8") as f:  # one finished fact, one cut short
        f.write('{"known_id": 3, "p_clean": 0.5}\n{"known_id": 4, "p_cl')
    assert _resume(path, run) == {3: {"known_id": 3, "p_clean": 0.5}}
    assert path.read_text(encoding="utf-8").endswith("0.5}\n")  # appends start on a new line
    other = {"model": "smollm2-135m", "config": {"noise": 0.2, "samples": 1}}
    assert _resume(path, other) == {}
    assert _resume(path, other) == {}  # the file now belongs to the other settings


def test_fact_sources_keep_order_drop_repeats_and_name_bad_input(tmp_path: Path) -> None:
    from memedit.locate import FACT_SOURCES, load_counterfact_facts, load_facts, load_known

    known = load_known()
    facts = load_facts(FACT_SOURCES)
    assert facts[: len(known)] == [{**f, "source": "known_1000"} for f in known]
    rest = facts[len(known) :]
    assert rest and all(f["source"] == "counterfact" for f in rest)
    assert all(str(f["known_id"]).startswith("counterfact:") for f in rest)
    keys = [(f["prompt"].strip(), f["attribute"].strip()) for f in facts]
    assert len(keys) == len(set(keys))
    assert all(f["subject"] in f["prompt"] for f in rest[:200])
    with pytest.raises(ValueError, match="fact sources must be among"):
        load_facts(["known_1000", "wikipedia"])
    bad = tmp_path / "cf.json"
    bad.write_text(
        '[{"case_id": 0, "prompt": "X is in", "subject": "X", "ground_truth": "Y"},'
        ' {"case_id": 1, "prompt": "Z is in", "subject": "Z"}]',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"cf.json: record 1 has no 'ground_truth'"):
        load_counterfact_facts(bad)


def test_later_sources_are_examined_only_until_n_facts_are_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import memedit.locate.run as run

    seen: list[int] = []

    def every_other(model: object, tok: object, facts: list[dict[str, object]]) -> list[object]:
        seen.append(len(facts))
        return [(dict(f), 0) for f in facts if int(str(f["known_id"]).split(":")[-1]) % 2 == 0]

    monkeypatch.setattr(run, "known_facts", every_other)
    head = [{"known_id": i, "source": "known_1000"} for i in range(10)]
    rest = [{"known_id": f"counterfact:{i}", "source": "counterfact"} for i in range(1000)]
    examined, known = run._examine(None, None, head + rest, n=60, chunk=50)  # type: ignore[arg-type]
    # all 10 of the first source (5 known), then chunks of 50 (25 known each) until >= 60
    assert seen == [10, 50, 50, 50]
    assert len(examined) == 160 and len(known) == 80
    examined, known = run._examine(None, None, head + rest, n=3, chunk=50)  # type: ignore[arg-type]
    assert len(examined) == 10 and len(known) == 5  # the first source is always examined whole
