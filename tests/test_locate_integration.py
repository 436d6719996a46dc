"""Causal tracing on the packaged default model and real known facts: the noise hurts the
answer, restoring the last layer's residual at the last token gives the clean answer back,
every restored probability is a probability, and restoring the last subject token's residual
in the lower-middle layers recovers part of the answer (the ROME paper's early site)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memedit.locate import (
    TraceConfig,
    aggregate,
    embedding_std,
    known_facts,
    load_known,
    trace_fact,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traced(knowedit: Path) -> dict[str, Any]:
    from memedit.models import load_model

    model, tok = load_model()
    facts = load_known(knowedit / "dev" / "known_1000.json")[:40]
    known = known_facts(model, tok, facts)[:3]
    sigma = embedding_std(model, tok, [f for f, _ in known])
    config = TraceConfig(noise=3 * sigma, samples=1)
    traces = []
    for fact, answer in known:
        ft = trace_fact(model, tok, fact["prompt"], fact["subject"], answer, config)
        traces.append(
            {
                "subject": list(ft.subject),
                "p_clean": ft.p_clean,
                "p_corrupt": ft.p_corrupt,
                "restored": ft.restored,
            }
        )
    return {"known": known, "traces": traces, "layers": model.config.num_hidden_layers}


def test_known_facts_are_answered_and_the_noise_hurts(traced: dict[str, Any]) -> None:
    assert len(traced["known"]) == 3
    for tr in traced["traces"]:
        assert tr["p_clean"] > 0.05
        assert tr["p_corrupt"] < tr["p_clean"]


def test_restored_values_are_probabilities_and_the_last_layer_restores_the_answer(
    traced: dict[str, Any],
) -> None:
    for tr in traced["traces"]:
        for table in tr["restored"].values():
            assert len(table[0]) == traced["layers"]
            assert all(0.0 <= v <= 1.0 for row in table for v in row)
        # the last layer's output at the last position is everything the answer depends on
        assert tr["restored"]["hidden"][-1][-1] == pytest.approx(tr["p_clean"], rel=1e-3)
        # before the subject nothing is corrupted, so restoring there changes nothing
        for row in tr["restored"]["hidden"][: tr["subject"][0]]:
            assert row == pytest.approx([tr["p_corrupt"]] * len(row), abs=1e-6)


def test_last_subject_token_in_middle_layers_recovers_the_answer(traced: dict[str, Any]) -> None:
    effects = aggregate(traced["traces"], ("hidden", "mlp", "attn"))
    early = effects["hidden"]["last subject token"][2:12]
    assert sum(early) / len(early) > 0.02
    # and the MLP window there helps more than at the top of the network
    mlp = effects["mlp"]["last subject token"]
    assert max(mlp[2:12]) > max(mlp[-3:])
    for table in effects.values():
        assert all(-1.0 <= v <= 1.0 for row in table.values() for v in row)
