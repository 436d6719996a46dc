"""AdaLoRA (``adapter:adalora``, through peft) and T-Patcher (``adapter:tpatcher``) end to end on
the packaged default model and a real ZsRE dev record: the edit flips the teacher-forced answer
and its rephrasing follows; AdaLoRA merges into the weights and its rollback restores them and
the logits bit for bit; T-Patcher never writes the weights, leaves unrelated prompts' logits
exactly as they were, answers the same from a reopened memory, and its rollback restores the
logits exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit.datasets import load_requests
from memedit.editable import EditableModel
from memedit.intrinsic import model_digest

pytestmark = pytest.mark.integration


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
    digest = model_digest(parts["model"])
    wrapped = _wrap(parts, tmp_path / "mem")
    yield wrapped
    wrapped.close()
    assert model_digest(parts["model"]) == digest, "the weights must be restored"


def _logits(parts: dict[str, Any], text: str) -> torch.Tensor:
    ids = parts["tok"](text, return_tensors="pt").to(parts["model"].device)
    with torch.no_grad():
        return parts["model"](**ids).logits


def test_adalora_edit_flips_a_zsre_answer_its_rephrasing_follows_and_unmerges_exactly(
    em: EditableModel, parts: dict[str, Any]
) -> None:
    pytest.importorskip("peft")
    req = load_requests("ZsRE", limit=1)[0]
    digest = model_digest(parts["model"])
    base = _logits(parts, req.prompt)
    before = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
    assert before[0] < 1.0
    [rec] = em.edit(req, strategy="adapter", method="adalora")
    try:
        assert model_digest(parts["model"]) != digest  # merged into the weights
        after = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
        assert after[0] == 1.0 and after[1] > before[1]
    finally:
        em.rollback(rec.id)
    assert model_digest(parts["model"]) == digest
    assert torch.equal(_logits(parts, req.prompt), base)


def test_tpatcher_flips_a_zsre_answer_its_rephrasing_follows_and_rolls_back_exactly(
    em: EditableModel, parts: dict[str, Any], tmp_path: Path
) -> None:
    req = load_requests("ZsRE", limit=1)[0]
    digest = model_digest(parts["model"])
    base_edit = _logits(parts, req.prompt)
    before = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
    assert before[0] < 1.0

    [rec] = em.edit(req, strategy="adapter", method="tpatcher")
    try:
        assert model_digest(parts["model"]) == digest  # a patch beside the weights
        after = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
        assert after[0] == 1.0 and after[1] > before[1]
        em.memory.save()  # the patch is in the edit log: a reopened memory answers the same
        with _wrap(parts, tmp_path / "mem") as again, again.adapted():
            reopened = _logits(parts, req.prompt)
        with em.adapted():
            assert torch.equal(reopened, _logits(parts, req.prompt))
        assert not torch.equal(reopened, base_edit)
    finally:
        em.rollback(rec.id)
    with em.adapted():
        assert torch.equal(_logits(parts, req.prompt), base_edit)
    assert em.edits() == []


def test_tpatcher_leaves_unrelated_prompts_bit_for_bit(
    em: EditableModel, parts: dict[str, Any]
) -> None:
    reqs = load_requests("ZsRE", limit=3)
    req, other = reqs[0], reqs[2]
    probes = [other.prompt, "The capital of France is"]  # unrelated: other subjects
    base_probe = [_logits(parts, p) for p in probes]
    [rec] = em.edit(req, strategy="adapter", method="tpatcher")
    try:
        assert em.teacher_forced([req.prompt], [req.target_new]) == [1.0]
        with em.adapted():
            for p, b in zip(probes, base_probe, strict=True):
                assert torch.equal(_logits(parts, p), b), p
    finally:
        em.rollback(rec.id)
