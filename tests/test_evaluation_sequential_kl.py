"""ConvSent's KL locality in sequential mode: every case's reference distributions are taken
on the unedited model before the chain of edits (as single mode takes them), spilled to disk
float32 and read back at each checkpoint; a tiny random model and real ConvSent records."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest
from memedit.datasets import load_cases
from memedit.editable import EditableModel, RouterConfig
from memedit.evaluation import EvalConfig, EvalOptions, evaluate, register_strategy, suite_for
from memedit.evaluation.runner import _LiveSpill, records_path
from memedit.evaluation.strategies import weights_digest
from memedit.evaluation.suites_special import ConvSentSuite
from memedit.metrics import convsent_kl, next_token_logprobs
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath, OverlapScope
from .tiny import tiny_llama

FAST = EvalOptions(fluency_tokens=0, generation=False)


@dataclass
class _Restore:
    weight: torch.Tensor
    saved: torch.Tensor

    def revert(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.saved)  # bit for bit


@dataclass(frozen=True)
class Perturb:
    """An edit that changes every next-token distribution: adds a random matrix seeded by the
    record to the output head (reverted exactly). ``fail_at``: raise on that apply (1-based),
    once per entry of ``failures`` left, as a run killed mid-chain."""

    name: str = "perturb"
    fail_at: int = 0
    failures: list[int] = field(default_factory=list)
    applies: list[int] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        return {"strategy": "perturb"}

    def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> _Restore:
        assert em.model is not None
        self.applies.append(int(requests[0].meta["index"]))
        if self.failures and len(self.applies) == self.fail_at:
            self.failures.pop()
            msg = "killed mid-chain"
            raise RuntimeError(msg)
        weight = em.model.get_output_embeddings().weight
        saved = weight.detach().clone()
        gen = torch.Generator().manual_seed(1 + int(requests[0].meta["index"]))
        with torch.no_grad():
            weight.add_(0.5 * torch.randn(weight.shape, generator=gen))
        return _Restore(weight, saved)


PERTURB = Perturb()
register_strategy("perturb", lambda method, opts: PERTURB)


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    wrapped = EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=4),
        model_name="tiny",
    )
    yield wrapped
    wrapped.close()


def config(out: Path, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = dict(
        datasets=("ConvSent",),
        strategies=("perturb",),
        limit=2,
        out=str(out),
        options=FAST,
        verify_revert="all",
    )
    base.update(kw)
    return EvalConfig(**base)


def kl(out: Path, spec: str, mode: str = "sequential") -> dict[tuple[int, int], float]:
    """(T, index) -> convsent_kl of every record line (T = 0 in single mode)."""
    path = records_path(out, "ConvSent", spec, mode)
    items = [json.loads(x) for x in path.read_text().splitlines()]
    return {(int(r.get("T", 0)), int(r["index"])): r["metrics"]["convsent_kl"] for r in items}


def spilled(out: Path) -> list[Path]:
    return sorted((out / "work").glob("live/**/*")) if (out / "work").exists() else []


@pytest.fixture
def count_before_edit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = ConvSentSuite.before_edit

    def counting(self: ConvSentSuite, em: EditableModel, case: Any, opts: EvalOptions) -> Any:
        calls.append(case.index)
        return original(self, em, case, opts)

    monkeypatch.setattr(ConvSentSuite, "before_edit", counting)
    return calls


def test_sequential_t1_gives_single_modes_kl(em: EditableModel, tmp_path: Path) -> None:
    digest = weights_digest(em.model)
    single = kl(evaluate(em, config(tmp_path / "s", limit=1), progress=False), "perturb", "single")
    seq = kl(evaluate(em, config(tmp_path / "q", limit=1, sequential=1), progress=False), "perturb")
    assert single[(0, 0)] > 1e-3  # the edit moved the distributions
    assert seq == {(1, 0): single[(0, 0)]}  # same reference, same edit: the same number
    assert weights_digest(em.model) == digest and spilled(tmp_path / "q") == []


def test_every_checkpoint_compares_against_the_unedited_model(
    em: EditableModel, tmp_path: Path
) -> None:
    cases = load_cases("ConvSent", limit=2)
    suite = suite_for("ConvSent")
    assert isinstance(suite, ConvSentSuite)
    outer = [(p.prompt, p.answers[0]) for p in cases[1].requests[0].locality if p.answers]
    from memedit.metrics import convsent_prompt

    prompts, answers = [convsent_prompt(p) for p, _ in outer], [a for _, a in outer]
    # by hand: case 1 at T = 2 against the unedited model, and against the model after case
    # 0's edit (what taking the state "right before case 1's edit" in the chain would give)
    unedited = suite.before_edit(em, cases[1], FAST)
    first = Perturb().apply(em, cases[0].requests)
    after_first = em.score_routed(prompts, answers, next_token_logprobs)
    second = Perturb().apply(em, cases[1].requests)
    post = em.score_routed(prompts, answers, next_token_logprobs)
    second.revert()
    first.revert()
    right, wrong = convsent_kl(unedited, post), convsent_kl(after_first, post)
    assert abs(right - wrong) > 1e-3  # the two references really differ

    out = evaluate(em, config(tmp_path / "o", sequential=2, checkpoints=(1, 2)), progress=False)
    got = kl(out, "perturb")
    assert set(got) == {(1, 0), (2, 0), (2, 1)}
    assert got[(2, 1)] == pytest.approx(right, rel=1e-6)
    assert got[(2, 0)] != pytest.approx(got[(1, 0)], rel=1e-3)  # two edits differ from one
    assert spilled(out) == [] and not (out / "work" / "live").exists()  # deleted after the run


def test_unedited_has_zero_kl_and_a_memory_edit_a_positive_one(
    em: EditableModel, tmp_path: Path
) -> None:
    cfg = config(tmp_path / "o", strategies=("unedited", "memory"), sequential=2)
    out = evaluate(em, cfg, progress=False)
    unedited = kl(out, "unedited")
    assert set(unedited) == {(1, 0), (2, 0), (2, 1)}
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in unedited.values())
    # case 0's outer questions are about case 1's topic: once case 1 is edited too (T = 2)
    # they are routed to the memory path, and its distributions differ from the unedited ones
    memory = kl(out, "memory")
    assert memory[(2, 0)] > 1e-3
    assert em.edits() == []


def test_an_interrupted_sequential_run_resumes_with_the_same_kl(
    em: EditableModel, tmp_path: Path, count_before_edit: list[int]
) -> None:
    digest = weights_digest(em.model)
    flaky = Perturb(fail_at=2, failures=[1])
    register_strategy("flaky", lambda method, opts: flaky)
    cfg = config(tmp_path / "o", strategies=("flaky",), sequential=2, checkpoints=(1, 2))
    with pytest.raises(RuntimeError, match="killed mid-chain"):
        evaluate(em, cfg, progress=False)
    assert set(kl(Path(cfg.out), "flaky")) == {(1, 0)}
    assert weights_digest(em.model) == digest and spilled(Path(cfg.out)) == []
    assert count_before_edit == [0, 1]

    flaky.applies.clear()
    evaluate(em, cfg, progress=False)
    resumed = kl(Path(cfg.out), "flaky")
    lines = records_path(Path(cfg.out), "ConvSent", "flaky", "sequential").read_text()
    assert len(lines.splitlines()) == 3  # T = 1 was kept, not scored again
    assert count_before_edit == [0, 1, 0, 1]  # both are scored at T = 2

    flaky.applies.clear()
    again = config(tmp_path / "f", strategies=("flaky",), sequential=2, checkpoints=(1, 2))
    fresh = evaluate(em, again, progress=False)
    assert kl(fresh, "flaky") == pytest.approx(resumed, rel=1e-6)
    assert resumed[(2, 1)] > 1e-3

    flaky.applies.clear()
    count_before_edit.clear()
    evaluate(em, cfg, progress=False)  # nothing left to score: no reference is taken
    assert count_before_edit == [] and len(kl(Path(cfg.out), "flaky")) == 3


def test_sequential_live_off_reports_no_kl(
    em: EditableModel, tmp_path: Path, count_before_edit: list[int]
) -> None:
    out = evaluate(em, config(tmp_path / "o", sequential=2, sequential_live=False), progress=False)
    items = [
        json.loads(x)
        for x in records_path(out, "ConvSent", "perturb", "sequential").read_text().splitlines()
    ]
    assert len(items) == 3 and count_before_edit == []
    assert all("convsent_kl" not in r["metrics"] and "convsent_succ" in r["metrics"] for r in items)


def test_the_spill_reads_back_bit_for_bit_and_a_black_box_gives_none(tmp_path: Path) -> None:
    cases = load_cases("ConvSent", limit=2)
    state = [torch.randn(3, 7, dtype=torch.float32), torch.randn(2, 7, dtype=torch.float32)]
    spill = _LiveSpill(tmp_path / "live", lambda em, case, opts: state if case.index else None)
    spill.take(None, cases, FAST, "test", False)  # type: ignore[arg-type]
    back = spill.get(1)
    assert [t.dtype for t in back] == [torch.float32] * 2
    assert all(torch.equal(a, b) for a, b in zip(state, back, strict=True))
    assert spill.get(0) is None and spill.get(5) is None  # None is not written; 5 not taken
    assert [p.name for p in (tmp_path / "live").iterdir()] == ["1.pt"]
    spill.close()
    assert not (tmp_path / "live").exists()

    black = EditableModel(
        memory=EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder()),
        scope=OverlapScope(),
        chat_fn=lambda messages: "fine",
    )
    try:
        assert ConvSentSuite().before_edit(black, cases[0], FAST) is None
    finally:
        black.close()
