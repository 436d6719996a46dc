"""A sequential run's chain of edits is kept on disk: an interrupted run continues it without
re-applying the batches it holds, an edit applied but never recorded is rolled back, the base
model is handed back bit for bit, and the scores are those of an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from memedit import EditRequest
from memedit.editable import EditableModel, RouterConfig
from memedit.evaluation import EvalConfig, evaluate, register_strategy, weights_digest
from memedit.evaluation.chain import Chain, ChainError
from memedit.evaluation.runner import records_path
from memedit.evaluation.strategies import WrapperStrategy
from memedit.intrinsic import KeyStatistics, TextList
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath, OverlapScope
from .test_evaluation import FAST
from .tiny import tiny_llama

TEXT = TextList(("The capital of France is Paris. The sky is blue.",) * 10, name="tiny")


def tiny_wrapper(tmp_path: Path) -> EditableModel:
    """A tiny random Llama wrapped with a hashing memory and its own key statistics."""
    model, tok = tiny_llama()
    return EditableModel(
        model,
        tok,
        memory=EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder()),
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=4),
        model_name="tiny",
        statistics=KeyStatistics(TEXT, root=tmp_path / "stats", progress=False),
    )


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    wrapped = tiny_wrapper(tmp_path)
    yield wrapped
    wrapped.close()


class Flaky(WrapperStrategy):
    """A wrapper strategy that records the batches it applies and fails on call ``fail_at``."""

    calls: list[list[int]]
    fail_at: int | None = None

    def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Any:
        Flaky.calls.append([int(r.meta["index"]) for r in requests])
        if Flaky.fail_at is not None and len(Flaky.calls) == Flaky.fail_at:
            msg = "interrupted"
            raise KeyboardInterrupt(msg)
        return super().apply(em, requests)


def _config(out: Path, strategy: str, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = dict(
        datasets=("ZsRE",),
        strategies=(strategy,),
        out=str(out),
        options=FAST,
        verify_revert="all",
    )
    base.update(kw)
    return EvalConfig(**base)


def _scores(out: Path, spec: str) -> dict[tuple[int, int], Any]:
    path = records_path(out, "ZsRE", spec, "sequential")
    items = [json.loads(x) for x in path.read_text().splitlines()]
    return {(int(i["T"]), int(i["index"])): i["metrics"] for i in items}


def test_an_interrupted_chain_continues_where_it_was_recorded(
    em: EditableModel, tmp_path: Path
) -> None:
    Flaky.calls, Flaky.fail_at = [], 3
    register_strategy("flaky-memory", lambda method, opts: Flaky("memory"))
    cfg = _config(
        tmp_path / "out", "flaky-memory", limit=6, sequential=6, edit_batch=2, checkpoints=(2, 4)
    )
    with pytest.raises(KeyboardInterrupt):
        evaluate(em, cfg, progress=False)
    assert Flaky.calls == [[0, 1], [2, 3], [4, 5]]
    assert sorted({t for t, _ in _scores(tmp_path / "out", "flaky-memory")}) == [2, 4]
    assert em.edits() == []  # the evaluator's own wrapper holds nothing
    directory = tmp_path / "out" / "work" / "chain" / "ZsRE" / "flaky-memory"
    kept = json.loads((directory / "chain.json").read_text())
    assert kept["batches"] == [[0, 1], [2, 3]]
    # an edit that reached the log but was never recorded (a kill mid-checkpoint) is undone
    chain = Chain.open(directory, em)
    assert chain.cases == 4 and len(chain.em.edits()) == 4
    (stray,) = chain.em.edit(EditRequest(prompt="Who wrote Faust?", target_new="Goethe"))
    chain.close()

    Flaky.calls, Flaky.fail_at = [], None
    evaluate(em, cfg, progress=False)
    assert Flaky.calls == [[4, 5]]  # the kept batches were not applied again
    scores = _scores(tmp_path / "out", "flaky-memory")
    assert sorted(k for k in scores if k[0] == 6) == [(6, i) for i in range(6)]
    memory = EditMemory.open(directory / "memory", embedder=HashingEmbedder())
    try:
        assert not memory.get(stray.id).active
        assert len(memory.list()) == 6
    finally:
        memory.close()
    assert json.loads((directory / "chain.json").read_text())["batches"][-1] == [4, 5]
    Flaky.calls = []
    evaluate(em, cfg, progress=False)  # complete: nothing applied, nothing scored again
    assert Flaky.calls == []


def test_an_in_weight_chain_resumes_to_the_scores_of_an_uninterrupted_run(
    em: EditableModel, tmp_path: Path
) -> None:
    assert em.model is not None
    base = weights_digest(em.model)
    opts = {"layer": 1, "lr": 1e-2, "steps": 5}
    register_strategy("flaky-ft", lambda method, opts_: Flaky("weights", "ft-m", opts))
    kw: dict[str, Any] = dict(limit=3, sequential=3, checkpoints=(1, 2, 3))
    Flaky.calls, Flaky.fail_at = [], None
    evaluate(em, _config(tmp_path / "whole", "flaky-ft", **kw), progress=False)
    assert weights_digest(em.model) == base
    whole = _scores(tmp_path / "whole", "flaky-ft")

    Flaky.calls, Flaky.fail_at = [], 3
    with pytest.raises(KeyboardInterrupt):
        evaluate(em, _config(tmp_path / "cut", "flaky-ft", **kw), progress=False)
    assert weights_digest(em.model) == base  # handed back unedited though interrupted
    Flaky.calls, Flaky.fail_at = [], None
    evaluate(em, _config(tmp_path / "cut", "flaky-ft", **kw), progress=False)
    assert Flaky.calls == [[2]]
    assert weights_digest(em.model) == base
    assert _scores(tmp_path / "cut", "flaky-ft") == whole  # the restored deltas are exact


def test_a_chain_of_other_batches_is_refused(em: EditableModel, tmp_path: Path) -> None:
    Flaky.calls, Flaky.fail_at = [], None
    register_strategy("flaky-memory", lambda method, opts: Flaky("memory"))
    out = tmp_path / "out"
    evaluate(em, _config(out, "flaky-memory", limit=2, sequential=2), progress=False)
    directory = out / "work" / "chain" / "ZsRE" / "flaky-memory"
    kept = json.loads((directory / "chain.json").read_text())
    kept["batches"][0] = [7]
    (directory / "chain.json").write_text(json.dumps(kept))
    with pytest.raises(ChainError, match="delete the directory"):
        evaluate(em, _config(out, "flaky-memory", limit=2, sequential=2), progress=False)
    assert em.edits() == []
