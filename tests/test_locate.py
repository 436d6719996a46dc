"""Causal tracing on tiny random models: exact identities, hook hygiene, grouping, choice."""

from __future__ import annotations

import pytest

from memedit.locate import GROUPS, TraceConfig, group_positions, recommend, trace_fact
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
