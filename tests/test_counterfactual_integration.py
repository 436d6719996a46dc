"""The default counterfactual path on the packaged model and real ZsRE dev records."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from memedit.counterfactual import AdapterPath, default_counterfactual_path
from memedit.datasets import load_requests
from memedit.generation import greedy_generate
from memedit.metrics import teacher_forced_accuracy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any, Any]:
    from memedit.models import load_model

    model, tok = load_model()
    return model, tok, default_counterfactual_path(model, tok, progress=False)


def test_default_path_is_the_shipped_adapter_and_reaches_the_floor(
    smol: tuple[Any, Any, Any],
) -> None:
    model, tok, path = smol
    assert isinstance(path, AdapterPath)
    reqs = load_requests("ZsRE", limit=40)
    targets = [r.target_new for r in reqs]
    edit_prompts = [path.build_input(r.prompt, [r], tok) for r in reqs]
    reph = [r for r in reqs if r.rephrase]
    reph_prompts = [path.build_input(r.rephrase[0], [r], tok) for r in reph]
    with path.activate(model):
        edit = teacher_forced_accuracy(model, tok, edit_prompts, targets, batch_size=16)
        rephrase = teacher_forced_accuracy(
            model, tok, reph_prompts, [r.target_new for r in reph], batch_size=16
        )
    assert statistics.fmean(edit) >= 0.90
    assert statistics.fmean(rephrase) >= 0.85


def test_activate_restores_the_model_bit_for_bit(smol: tuple[Any, Any, Any]) -> None:
    model, tok, path = smol
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = tok("Q: Where did Leo Arons die?\nA:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        with path.activate(model):
            inside = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(inside, before)
    assert torch.equal(after, before)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), path.activate(model):
        model(ids)
        raise RuntimeError("inside")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_chat_and_raw_generation_answer_with_the_edit(smol: tuple[Any, Any, Any]) -> None:
    model, tok, path = smol
    req = load_requests("WikiData_counterfact", limit=1)[0]  # Leonardo DiCaprio -> Syria
    chat = path.build_chat_input([{"role": "user", "content": req.rephrase[0]}], [req], tok)
    raw = path.build_input(req.prompt, [req], tok)
    with path.activate(model):
        chat_out = greedy_generate(model, tok, chat, max_new_tokens=12, add_special_tokens=False)
        raw_out = greedy_generate(model, tok, raw, max_new_tokens=6)
    assert req.target_new in chat_out
    assert raw_out.strip().startswith(req.target_new)
