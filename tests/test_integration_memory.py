"""The memory strategy end to end on the packaged default model and real KnowEdit records."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit.datasets import load_requests
from memedit.editable import EditableModel
from memedit.generation import greedy_generate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from memedit.counterfactual import default_counterfactual_path
    from memedit.models import load_model
    from memedit.scope import load_scope_classifier

    model, tok = load_model()
    return {
        "model": model,
        "tok": tok,
        "scope": load_scope_classifier(progress=False),
        "cf": default_counterfactual_path(model, tok, progress=False),
    }


def _wrap(parts: dict[str, Any], path: Path) -> EditableModel:
    from memedit.stores.memory import EditMemory

    return EditableModel(
        parts["model"],
        parts["tok"],
        memory=EditMemory.open(path),
        scope=parts["scope"],
        counterfactual=parts["cf"],
        model_name="smollm2-135m",
    )


@pytest.fixture
def em(parts: dict[str, Any], tmp_path: Path) -> Iterator[EditableModel]:
    wrapped = _wrap(parts, tmp_path / "mem")
    yield wrapped
    wrapped.close()


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")


def test_edit_flips_answer_rephrase_follows_unrelated_stays_rollback_restores(
    em: EditableModel, parts: dict[str, Any], tmp_path: Path
) -> None:
    req = load_requests("WikiData_counterfact", limit=1)[0]  # Leonardo DiCaprio -> Syria
    unrelated = req.locality[0].prompt
    model, tok = parts["model"], parts["tok"]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = greedy_generate(model, tok, req.prompt, max_new_tokens=8)
    before_unrelated = greedy_generate(model, tok, unrelated, max_new_tokens=8)
    assert "Syria" not in before

    [rec] = em.edit(req)
    after = em.generate(req.prompt, max_new_tokens=8)
    assert after.decision.in_scope and after.decision.used_edit_ids == (rec.id,)
    assert "Syria" in _first_line(after.text)
    rephrased = em.generate(req.rephrase[0], max_new_tokens=8)
    assert rephrased.decision.in_scope
    assert "Syria" in _first_line(rephrased.text)
    other = em.generate(unrelated, max_new_tokens=8)
    assert not other.decision.in_scope
    assert other.text == before_unrelated
    chat = em.chat([{"role": "user", "content": req.prompt}], max_new_tokens=16)
    assert "Syria" in chat.text

    # A restart: a new wrapper over the same memory directory still has the edit.
    em.memory.save()
    again = _wrap(parts, tmp_path / "mem")
    try:
        assert "Syria" in _first_line(again.generate(req.prompt, max_new_tokens=8).text)
        again.rollback(rec.id)
        assert again.generate(req.prompt, max_new_tokens=8).text == before
    finally:
        again.close()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_memory_strategy_floors_on_zsre(em: EditableModel, parts: dict[str, Any]) -> None:
    """60 real ZsRE dev records, all in memory at once: the edited answer is produced
    (teacher-forced) and locality prompts' predictions do not move."""
    from memedit.metrics import locality_agreement, predicted_tokens

    reqs = load_requests("ZsRE", limit=60)
    loc = [(p.prompt, p.answers[0]) for r in reqs for p in r.locality[:1] if p.answers]
    pre = predicted_tokens(parts["model"], parts["tok"], [p for p, _ in loc], [a for _, a in loc])
    em.edit(reqs)
    edit_acc = em.teacher_forced([r.prompt for r in reqs], [r.target_new for r in reqs])
    post = em.predicted_tokens([p for p, _ in loc], [a for _, a in loc])
    locality = [locality_agreement(a, b) for a, b in zip(pre, post, strict=True)]
    assert statistics.fmean(edit_acc) >= 0.90
    assert statistics.fmean(locality) >= 0.95
