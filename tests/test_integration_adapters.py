"""GRACE (``adapter:grace``) and WISE (``adapter:wise``) end to end on the packaged default
model and real ZsRE dev records: the edit flips the greedy answer (WISE: and its rephrasing
follows), an unrelated prompt's logits do not move at all, a reopened memory answers the same
from the logged adapter state, and a rollback restores the logits exactly (the weights are
never touched)."""

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
    assert model_digest(parts["model"]) == digest, "GRACE must not change the weights"


def _logits(parts: dict[str, Any], text: str) -> torch.Tensor:
    ids = parts["tok"](text, return_tensors="pt").to(parts["model"].device)
    with torch.no_grad():
        return parts["model"](**ids).logits


def test_grace_flips_zsre_answers_leaves_others_and_rolls_back_exactly(
    em: EditableModel, parts: dict[str, Any], tmp_path: Path
) -> None:
    reqs = load_requests("ZsRE", limit=3)
    edited, unrelated = reqs[:2], reqs[2]
    probes = [unrelated.prompt, edited[0].locality[0].prompt, "The capital of France is"]
    base_edit = [_logits(parts, r.prompt) for r in edited]
    base_probe = [_logits(parts, p) for p in probes]
    before = [em.generate(r.prompt, max_new_tokens=12).text for r in edited]
    assert not any(r.target_new in b for r, b in zip(edited, before, strict=True))

    records = em.edit(edited, strategy="adapter", method="grace")
    try:
        for r in edited:  # every edit of the batch is applied
            answer = em.generate(r.prompt, max_new_tokens=12)
            assert r.target_new in answer.text and not answer.decision.in_scope
        assert em.teacher_forced([r.prompt for r in edited], [r.target_new for r in edited]) == [
            1.0,
            1.0,
        ]
        with em.adapted():
            for p, base in zip(probes, base_probe, strict=True):
                assert torch.equal(_logits(parts, p), base), p
        # the codebook lives in the edit log: a reopened memory answers the same
        em.memory.save()
        with _wrap(parts, tmp_path / "mem") as again, again.adapted():
            reopened = _logits(parts, edited[0].prompt)
        with em.adapted():
            assert torch.equal(reopened, _logits(parts, edited[0].prompt))
        assert not torch.equal(reopened, base_edit[0])
    finally:
        for rec in reversed(records):
            if em.memory.get(rec.id).active:
                em.rollback(rec.id)
    with em.adapted():
        for r, base in zip(edited, base_edit, strict=True):
            assert torch.equal(_logits(parts, r.prompt), base)
    assert em.edits() == []


def test_cli_edits_with_grace_answers_after_a_fresh_load_and_rolls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memedit.cli import main

    req = load_requests("ZsRE", limit=1)[0]
    mem = str(tmp_path / "mem")
    ask = ["ask", "--memory", mem, "--raw", "--max-new-tokens", "8", req.prompt]
    assert main(ask) == 0
    before = capsys.readouterr().out.splitlines()[0]
    assert req.target_new not in before

    edit = ["edit", "--memory", mem, "--strategy", "adapter", "--method", "grace"]
    assert main([*edit, "--prompt", req.prompt, "--target", req.target_new]) == 0
    assert "#1:" in capsys.readouterr().out
    assert main(["edits", "--memory", mem]) == 0
    assert "(adapter:grace)" in capsys.readouterr().out
    assert main(ask) == 0  # a fresh process's load restores the logged codebook
    assert req.target_new in capsys.readouterr().out.splitlines()[0]

    assert main(["rollback", "--memory", mem, "1"]) == 0
    assert "rolled back #1" in capsys.readouterr().out
    assert main(ask) == 0
    assert capsys.readouterr().out.splitlines()[0] == before


def test_lora_edit_through_peft_flips_the_answer_and_unmerges_bit_for_bit(
    em: EditableModel, parts: dict[str, Any]
) -> None:
    pytest.importorskip("peft")
    req = load_requests("ZsRE", limit=1)[0]
    digest = model_digest(parts["model"])
    base = _logits(parts, req.prompt)
    assert em.teacher_forced([req.prompt], [req.target_new]) != [1.0]
    [rec] = em.edit(req, strategy="adapter", method="lora")
    try:
        assert model_digest(parts["model"]) != digest  # merged into the weights
        assert em.teacher_forced([req.prompt], [req.target_new]) == [1.0]
        assert req.target_new in em.generate(req.prompt, max_new_tokens=12).text
    finally:
        em.rollback(rec.id)
    assert model_digest(parts["model"]) == digest
    assert torch.equal(_logits(parts, req.prompt), base)


def test_wise_flips_a_zsre_answer_follows_its_rephrasing_and_rolls_back_exactly(
    em: EditableModel, parts: dict[str, Any], tmp_path: Path
) -> None:
    req = load_requests("ZsRE", limit=1)[0]
    base_edit = _logits(parts, req.prompt)
    before = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
    assert before[0] < 1.0

    [rec] = em.edit(req, strategy="adapter", method="wise")
    try:
        after = em.teacher_forced([req.prompt, req.rephrase[0]], [req.target_new] * 2)
        assert after[0] == 1.0 and after[1] > before[1]  # the edit, and its rephrasing follows
        em.memory.save()  # the side memory is in the edit log: a reopened memory answers the same
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


def test_wise_leaves_unrelated_prompts_on_the_main_memory(
    em: EditableModel, parts: dict[str, Any]
) -> None:
    req, other = load_requests("ZsRE", limit=3)[::2]
    nq = "nq question: who is the quarterback for the green bay packers"  # the WISE paper's kind
    probes = [other.prompt, "The capital of France is", nq]  # unrelated: other subjects
    base_probe = [_logits(parts, p) for p in probes]
    [rec] = em.edit(req, strategy="adapter", method="wise")
    try:
        assert em.teacher_forced([req.prompt], [req.target_new]) == [1.0]
        with em.adapted():
            for p, base in zip(probes, base_probe, strict=True):
                assert torch.equal(_logits(parts, p), base), p
    finally:
        em.rollback(rec.id)
