"""The value cache on tiny random models: a repeated edit on the same weights reads its value
back instead of optimising it and writes the same delta bit for bit; other weights, another
request or other hyperparameters miss; outside ``with value_cache`` nothing is read or
written; a sequential evaluator run re-applying its chain hits on every step."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import memedit.intrinsic.values as values
from memedit.intrinsic import KeyStatistics, apply_edit, value_cache

from .test_intrinsic_methods import REQUEST, ROME_HP, SECOND, TEXT
from .tiny import tiny_llama


@pytest.fixture
def stats(tmp_path: Path) -> Iterator[KeyStatistics]:
    yield KeyStatistics(TEXT, root=tmp_path / "stats", progress=False)


@pytest.fixture
def optimised(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests the real optimisation ran for."""
    count: list[int] = []
    real = values._optimise_chunk

    def counting(*args: Any, **kwargs: Any) -> Any:
        count.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(values, "_optimise_chunk", counting)
    return count


def _update(model: Any, tok: Any, stats: KeyStatistics, **hp: Any) -> torch.Tensor:
    delta = apply_edit("rome", model, tok, [REQUEST], {**ROME_HP, **hp}, stats=stats)
    (name,) = delta.names
    after = model.get_parameter(name).detach().clone()
    delta.revert()
    return after


def test_a_repeated_edit_reads_its_value_back_and_writes_the_same_weights(
    tmp_path: Path, stats: KeyStatistics, optimised: list[int]
) -> None:
    model, tok = tiny_llama()
    plain = _update(model, tok, stats)
    assert sum(optimised) == 1
    with value_cache(tmp_path / "values") as cache:
        first = _update(model, tok, stats)
        second = _update(model, tok, stats)
    assert (cache.misses, cache.hits) == (1, 1)
    assert sum(optimised) == 2  # the second edit did not optimise
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert len(list((tmp_path / "values").rglob("*.safetensors"))) == 1
    with value_cache(tmp_path / "values") as cache:
        _update(model, tok, stats, v_steps=3)  # other hyperparameters: a miss
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # other weights: a miss
        _update(model, tok, stats)
    assert (cache.misses, cache.hits) == (2, 0)
    _update(model, tok, stats)  # no cache active: nothing read or written
    assert len(list((tmp_path / "values").rglob("*.safetensors"))) == 3


def test_a_context_stands_for_the_weights(tmp_path: Path, stats: KeyStatistics) -> None:
    model, tok = tiny_llama()
    with value_cache(tmp_path / "values", context="chain A after 0") as cache:
        first = _update(model, tok, stats)
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # weights differ, the context says the same
        _update(model, tok, stats)
        cache.context = "chain A after 1"
        _update(model, tok, stats)
    assert (cache.misses, cache.hits) == (2, 1)
    assert first.shape == model.get_parameter("model.layers.1.mlp.down_proj.weight").shape


def test_a_request_in_a_batch_hits_alone_and_the_rest_is_optimised(
    tmp_path: Path, stats: KeyStatistics, optimised: list[int]
) -> None:
    model, tok = tiny_llama()
    hp = {"layers": (0, 1), "v_weight_decay": 0.0, "clamp_norm_factor": 100.0}
    with value_cache(tmp_path / "values") as cache:
        d1 = apply_edit("memit", model, tok, [REQUEST], hp, stats=stats)
        d1.revert()
        d2 = apply_edit("memit", model, tok, [REQUEST, SECOND], hp, stats=stats)
    assert (cache.misses, cache.hits) == (2, 1)
    assert sum(optimised) == 2
    d2.revert()


def test_a_sequential_run_re_applying_its_chain_hits_every_value(tmp_path: Path) -> None:
    from memedit.evaluation import EvalConfig, evaluate, weights_digest

    from .test_evaluation import FAST
    from .test_evaluation_chain import tiny_wrapper

    em = tiny_wrapper(tmp_path)
    model = em.model
    spec = "weights:rome@layer=1;v_weight_decay=0.0;clamp_norm_factor=100.0;v_steps=4"
    out = tmp_path / "out"
    cfg = EvalConfig(
        datasets=("ZsRE",),
        strategies=(spec,),
        limit=3,
        sequential=3,
        checkpoints=(2, 3),
        out=str(out),
        options=FAST,
        verify_revert="all",
    )
    base = weights_digest(model)
    try:
        evaluate(em, cfg, progress=False)
        kept = sorted(p.name for p in (out / "values").rglob("*.safetensors"))
        assert len(kept) == 3  # one value per edit of the chain
        # another checkout: the records of T = 3 and the chain are gone, the values are not
        records = next((out / "records").rglob("*.jsonl"))
        lines = records.read_text().splitlines()
        records.write_text("\n".join(lines[:2]) + "\n")  # only T = 2 is scored
        shutil.rmtree(out / "work")
        seen: list[int] = []
        real = values._optimise_chunk

        def counting(*args: Any, **kwargs: Any) -> Any:
            seen.append(len(args[2]))
            return real(*args, **kwargs)

        values._optimise_chunk = counting  # type: ignore[assignment]
        try:  # the command now names another strategy too: the chain's values still hit
            evaluate(em, dataclasses.replace(cfg, strategies=(spec, "memory")), progress=False)
        finally:
            values._optimise_chunk = real  # type: ignore[assignment]
        assert seen == []  # every value of the re-applied chain was read back
        assert sorted(p.name for p in (out / "values").rglob("*.safetensors")) == kept
        again = [json.loads(x) for x in records.read_text().splitlines()[2:]]
        assert [x["metrics"] for x in again] == [json.loads(x)["metrics"] for x in lines[2:]]
        assert {x["values_reused"] for x in again} == {3}  # said on every line it scored
        assert weights_digest(model) == base
    finally:
        em.close()


def test_a_setting_added_later_keeps_earlier_keys_at_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value setting added after the key format (``LATER_FIELDS``) enters the key only when
    it is not at its default, so values stored before it existed are still found."""
    from memedit.intrinsic.rome import RomeHparams
    from memedit.intrinsic.value_cache import LATER_FIELDS, ValueCache

    model, tok = tiny_llama()
    cache = ValueCache(tmp_path)
    hp = RomeHparams()

    def key(h: RomeHparams) -> str:
        return cache.key(model, tok, REQUEST, "model.layers.1.mlp", [""], h)

    now = key(hp)
    assert key(dataclasses.replace(hp, after_factor=0.5)) != now
    real = dataclasses.asdict

    def without_later(obj: Any) -> dict[str, Any]:  # the hparams as they were before
        return {k: v for k, v in real(obj).items() if k not in LATER_FIELDS}

    monkeypatch.setattr(dataclasses, "asdict", without_later)
    assert key(hp) == now
