"""The counterfactual path on tiny random models: input text, hook-based adapter that leaves
the model bit-for-bit unchanged, training that lowers the loss, saving/loading with the base
model check, and the choice of the default path."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from memedit.counterfactual import (
    AdapterPath,
    CounterfactualPath,
    LoraConfig,
    LowRankAdapter,
    TemplatePath,
    default_counterfactual_path,
    find_adapter,
    load_adapter_path,
)
from memedit.counterfactual.train import (
    TrainConfig,
    TrainFact,
    _batch,
    _label_logits,
    build_examples,
    train_adapter,
    train_and_save,
)
from memedit.errors import IntegrityError
from memedit.types import EditRequest
from tests.adapter_kit import hook_count
from tests.tiny import tiny_llama

E1 = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
E2 = EditRequest(prompt="The capital of France is", target_new="Berlin")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_template_input_states_edits_as_qa_pairs_then_the_query() -> None:
    _, tok = tiny_llama()
    path = TemplatePath()
    assert isinstance(path, CounterfactualPath)
    text = path.build_input("In which city  did\nLeo Arons die?", [E1, E2], tok)
    assert text == (
        "Q: Where did Leo Arons die?\nA: Paris\n"
        "Q: The capital of France is\nA: Berlin\n"
        "Q: In which city did Leo Arons die?\nA:"
    )


def test_chat_input_puts_facts_in_the_system_message() -> None:
    _, tok = tiny_llama()
    path = TemplatePath()
    plain = path.build_chat_input([{"role": "user", "content": "Where did he die?"}], [E1], tok)
    assert plain.startswith("System: Answer with these facts")  # no template: plain transcript
    assert "Q: Where did Leo Arons die?\nA: Paris" in plain
    assert plain.endswith("User: Where did he die?\nAssistant:")

    tok.chat_template = CHAT_TEMPLATE
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Where did Leo Arons die?"},
    ]
    text = path.build_chat_input(msgs, [E1, E2], tok)
    assert text.startswith("<|system|>Be brief.\n\nAnswer with these facts")
    assert "A: Paris\nQ: The capital of France is\nA: Berlin</s><|user|>Hi</s>" in text
    assert text.endswith("<|user|>Where did Leo Arons die?</s><|assistant|>")
    assert text.count("<|system|>") == 1


def _trained_adapter(model: Any, seed: int = 0) -> LowRankAdapter:
    adapter = LowRankAdapter.for_model(model, LoraConfig(rank=4), seed=seed)
    with torch.no_grad():
        for _a, b in adapter.params.values():
            b.normal_(0.0, 0.5)
    return adapter


def test_adapter_changes_outputs_only_inside_and_restores_bit_for_bit() -> None:
    model, _ = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before_w = _weights(model)
    hooks_before = hook_count(model)
    with torch.no_grad():
        before = model(ids).logits
    path = AdapterPath(_trained_adapter(model))
    with torch.no_grad(), path.activate(model):
        inside = model(ids).logits
        assert hook_count(model) == hooks_before + 2 * 3  # 2 layers x q, v, o
    assert not torch.allclose(inside, before)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after, before)
    assert hook_count(model) == hooks_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_w[k]), k

    with pytest.raises(RuntimeError, match="boom"), path.activate(model):
        model(ids)
        raise RuntimeError("boom")
    assert hook_count(model) == hooks_before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_w[k]), k


def test_untrained_adapter_is_a_no_op() -> None:
    model, _ = tiny_llama()
    ids = torch.tensor([[5, 6, 7]])
    adapter = LowRankAdapter.for_model(model, LoraConfig(rank=2))
    with torch.no_grad():
        before = model(ids).logits
        with adapter.active(model):
            assert torch.equal(model(ids).logits, before)


def test_label_logits_equal_the_full_forward() -> None:
    model, _ = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 10, -100, -100]])
    with torch.no_grad():
        got, gold = _label_logits(model, ids, mask, labels)
        full = model(input_ids=ids, attention_mask=mask).logits
    assert gold.tolist() == [7, 8, 10]
    assert torch.allclose(got, torch.stack([full[0, 1], full[0, 2], full[1, 0]]), atol=1e-5)


FACTS = [
    TrainFact("Where did Leo Arons die?", "Paris", ("In which city did Leo Arons die?",)),
    TrainFact("The capital of France is", "Berlin", (), (("The sky is", "blue"),)),
    TrainFact("What is the name of the spouse of Leo Arons?", "France"),
]


def _loss(model: Any, adapter: LowRankAdapter | None, examples: list[Any]) -> float:
    ids, mask, labels = _batch(examples, 3, torch.device("cpu"))
    with torch.no_grad(), adapter.active(model) if adapter else nullcontext():
        logits, gold = _label_logits(model, ids, mask, labels)
    return float(torch.nn.functional.cross_entropy(logits, gold))


def test_training_reduces_loss_and_leaves_the_base_model_alone() -> None:
    model, tok = tiny_llama()
    before_w = _weights(model)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    cfg = TrainConfig(steps=30, batch_size=4, lr=5e-2, lora=LoraConfig(rank=4, layers=None))
    held = build_examples(FACTS, tok, replace(cfg, seed=1), 16)
    base_loss = _loss(model, None, held)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (10x on a busy CPU)
    try:
        adapter, losses = train_adapter(model, tok, FACTS, cfg)
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 30
    assert _loss(model, adapter, held) < base_loss - 0.3
    assert all(not t.requires_grad for t in adapter.parameters())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_w[k]), k
    # Layers None resolve to layers n // 3 .. n - 1: both of 2 here, 10-29 of SmolLM2's 30.
    assert {n.split(".")[2] for n in adapter.names} == {"0", "1"}
    thirty = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30))
    assert TrainConfig().resolved(thirty).lora.layers == tuple(range(10, 30))  # type: ignore[arg-type]


def test_saved_adapter_loads_only_on_its_own_base_model(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    cfg = TrainConfig(steps=2, batch_size=2)
    meta_path = train_and_save(model, tok, config=cfg, out_dir=tmp_path, name="cf-tiny")
    meta = json.loads(meta_path.read_text())
    assert meta["weights_file"] == "cf-tiny.safetensors"
    assert set(meta["training"]["files"]) == {
        "train/ZsRE/zsre_mend_eval_portability_gpt4.not_in_test.json",
        "train/WikiData_counterfact/train_cf.json",
    }
    assert meta["command"].startswith("python -m memedit.counterfactual.train")
    assert find_adapter(model, [meta_path]) == meta_path
    other, _ = tiny_llama(seed=1)
    assert find_adapter(other, [meta_path]) is None

    loaded = load_adapter_path(meta_path)
    assert isinstance(loaded, AdapterPath)
    with torch.no_grad():
        for name, (a, b) in loaded.adapter.params.items():
            assert a.shape[0] == 8 and b.shape[1] == 8, name

    weights = tmp_path / "cf-tiny.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="sha256"):
        load_adapter_path(meta_path)


def test_default_path_falls_back_to_template_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MEMEDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MEMEDIT_COUNTERFACTUAL_TRAIN", raising=False)
    model, tok = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="memedit.counterfactual.adapter"):
        path = default_counterfactual_path(model, tok, progress=False)
    assert isinstance(path, TemplatePath)
    assert "no trained counterfactual adapter matches" in caplog.text


def test_default_path_trains_on_first_use_and_reuses_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import memedit.counterfactual.train as train_mod

    monkeypatch.setenv("MEMEDIT_CACHE", str(tmp_path))
    small = TrainConfig(steps=3, batch_size=2)
    real = train_mod.train_and_save

    def quick(*args: Any, **kwargs: Any) -> Path:
        kwargs.setdefault("config", small)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_and_save", quick)
    model, tok = tiny_llama()
    path = default_counterfactual_path(model, tok, progress=False, train=True)
    assert isinstance(path, AdapterPath)
    cached = list((tmp_path / "counterfactual").glob("*/adapter.json"))
    assert len(cached) == 1
    monkeypatch.setattr(train_mod, "train_and_save", None)  # a second call must not train
    again = default_counterfactual_path(model, tok, progress=False)
    assert isinstance(again, AdapterPath)
