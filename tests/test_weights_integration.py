"""The weights strategy end to end on the packaged default model and real KnowEdit records:
a ROME edit flips the answer, its rephrasing moves toward the new target, another subject's
answer stays; the edited weights survive a restart through the bundle, and a rollback restores
them bit for bit. The CLI does the same with FT-M across processes' worth of reloads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit.cli import main
from memedit.datasets import load_requests
from memedit.editable import EditableModel
from memedit.generation import greedy_generate
from memedit.intrinsic import model_digest

pytestmark = pytest.mark.integration


@pytest.fixture
def em(parts: dict[str, Any], tmp_path: Path) -> Iterator[EditableModel]:
    from memedit.stores.memory import EditMemory

    digest = model_digest(parts["model"])

    wrapped = EditableModel(
        parts["model"],
        parts["tok"],
        memory=EditMemory.open(tmp_path / "mem"),
        scope=parts["scope"],
        counterfactual=parts["cf"],
        model_name="smollm2-135m",
    )
    yield wrapped
    wrapped.close()
    assert model_digest(parts["model"]) == digest, "a test left the weights edited"


def test_rome_edit_flips_the_answer_persists_and_rolls_back_bit_for_bit(
    em: EditableModel, parts: dict[str, Any], tmp_path: Path
) -> None:
    req, other = load_requests("WikiData_counterfact", limit=2)  # Leonardo DiCaprio -> Syria
    model, tok = parts["model"], parts["tok"]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = greedy_generate(model, tok, req.prompt, max_new_tokens=8)
    before_other = greedy_generate(model, tok, other.prompt, max_new_tokens=8)
    rephrase_before = _loglik(parts, req.rephrase[0], req.target_new)
    assert req.target_new not in before

    [rec] = em.edit(req, strategy="weights", method="rome")
    try:
        _check_edited(em, parts, req, other, before_other, rephrase_before, tmp_path)
    finally:
        if em.memory.get(rec.id).active:
            em.rollback(rec.id)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert greedy_generate(model, tok, req.prompt, max_new_tokens=8) == before


def _loglik(parts: dict[str, Any], prompt: str, target: str) -> float:
    from memedit.metrics import completion_log_likelihood

    return float(completion_log_likelihood(parts["model"], parts["tok"], [prompt], [target])[0])


def _check_edited(
    em: EditableModel,
    parts: dict[str, Any],
    req: Any,
    other: Any,
    before_other: str,
    rephrase_before: float,
    tmp_path: Path,
) -> None:
    model = parts["model"]
    [rec] = em.edits()
    assert rec.strategy == "weights" and rec.method == "rome"
    answer = em.generate(req.prompt, max_new_tokens=8)
    assert not answer.decision.in_scope  # the model itself answers: nothing is retrieved
    assert req.target_new in answer.text
    assert em.teacher_forced([req.prompt], [req.target_new])[0] == 1.0
    # the rephrasing moves toward the new target (ROME generalises only partly on this model)
    assert _loglik(parts, req.rephrase[0], req.target_new) > rephrase_before + 1.0
    assert em.generate(other.prompt, max_new_tokens=8).text == before_other
    edited = model_digest(model)

    bundle = em.save_pretrained(tmp_path / "bundle")
    again = EditableModel.from_pretrained(bundle, progress=False)  # a fresh base model
    try:
        assert again.model is not model and again.model is not None
        assert model_digest(again.model) == edited  # the delta re-applied exactly
        assert req.target_new in again.generate(req.prompt, max_new_tokens=8).text
    finally:
        again.close()
    em.rollback(rec.id)


def test_cli_edits_weights_answers_with_them_and_rolls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = load_requests("ZsRE", limit=1)[0]
    mem = str(tmp_path / "mem")
    ask = ["ask", "--memory", mem, "--raw", "--max-new-tokens", "8", req.prompt]
    assert main(ask) == 0
    before = capsys.readouterr().out.splitlines()[0]
    assert req.target_new not in before

    edit = ["edit", "--memory", mem, "--strategy", "weights", "--method", "ft-m"]
    assert main([*edit, "--prompt", req.prompt, "--target", req.target_new]) == 0
    assert "#1:" in capsys.readouterr().out
    assert main(["edits", "--memory", mem]) == 0
    assert "(weights:ft-m)" in capsys.readouterr().out
    assert main(ask) == 0  # a fresh load re-applies the logged delta
    assert req.target_new in capsys.readouterr().out.splitlines()[0]

    assert main(["rollback", "--memory", mem, "1"]) == 0
    assert "rolled back #1" in capsys.readouterr().out
    assert main(ask) == 0
    assert capsys.readouterr().out.splitlines()[0] == before
