"""The evaluator on a tiny random model and real KnowEdit records: strategies by name, single
and sequential modes, exact-revert checks, resumption, reports."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.datasets import load_cases
from memedit.editable import EditableModel, RouterConfig
from memedit.evaluation import (
    EvalConfig,
    EvalOptions,
    RevertError,
    aggregate,
    evaluate,
    parse_strategy,
    register_strategy,
    suite_for,
    summarise,
    weights_digest,
    write_reports,
    write_results,
)
from memedit.evaluation.report import load_records
from memedit.evaluation.runner import records_path
from memedit.evaluation.strategies import Unedited, WrapperStrategy
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import MarkerPath, OverlapScope
from .tiny import tiny_llama

FAST = EvalOptions(fluency_tokens=0, generation=False)


class CountingPath(MarkerPath):
    """MarkerPath that also counts how often the counterfactual path was entered."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = 0

    def build_input(self, query: str, edits: Sequence[EditRequest], tokenizer: object) -> str:
        self.entered += 1
        return super().build_input(query, edits, tokenizer)


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    wrapped = EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=CountingPath(),
        config=RouterConfig(max_new_tokens=4),
        model_name="tiny",
    )
    yield wrapped
    wrapped.close()


def config(tmp_path: Path, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = dict(
        datasets=("ZsRE",),
        strategies=("unedited", "memory"),
        limit=3,
        out=str(tmp_path / "out"),
        options=FAST,
        verify_revert="all",
    )
    base.update(kw)
    return EvalConfig(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------ strategy specs
def test_strategy_specs_parse_and_bad_ones_are_named() -> None:
    assert isinstance(parse_strategy("unedited"), Unedited)
    mem = parse_strategy("memory")
    assert isinstance(mem, WrapperStrategy) and mem.name == "memory"
    w = parse_strategy("weights:rome@layer=4;lr=0.5;norm=true;tag=a")
    assert isinstance(w, WrapperStrategy)
    assert w.config() == {
        "strategy": "weights",
        "method": "rome",
        "options": {"layer": 4, "lr": 0.5, "norm": True, "tag": "a"},
    }
    with pytest.raises(InvalidRequestError, match="unknown strategy 'magic'"):
        parse_strategy("magic")
    with pytest.raises(InvalidRequestError, match="key=value"):
        parse_strategy("memory@oops")
    with pytest.raises(InvalidRequestError, match="at least one dataset"):
        EvalConfig(datasets=())
    with pytest.raises(InvalidRequestError, match="workers=1"):
        EvalConfig(datasets=("ZsRE",), sequential=5, workers=2)
    with pytest.raises(InvalidRequestError, match="checkpoints"):
        EvalConfig(datasets=("ZsRE",), sequential=5, checkpoints=(9,))


# ------------------------------------------------------------------ aggregation
def test_grouped_metrics_average_per_record_over_its_kinds_then_over_records() -> None:
    records = [
        {"edit_succ": 1.0, "portability/A": 1.0, "portability/B": 0.0},
        {"edit_succ": 0.5, "portability/A": 1.0},
        {"edit_succ": math.nan, "portability/A": 1.0, "portability/B": math.nan},
        {"edit_succ": 1.0},
    ]
    assert aggregate(records, "edit_succ") == pytest.approx(5 / 6)  # nan skipped
    # EasyEdit's KnowEdit summary: per record (1 + 0) / 2, 1, 1 (nan kind skipped); the record
    # without any kind does not count -> 2.5 / 3. Kinds first would give (1 + 0) / 2 = 0.5.
    assert aggregate(records, "portability") == pytest.approx(2.5 / 3)
    assert math.isnan(aggregate(records, "locality"))


# ------------------------------------------------------------------ single mode
def test_single_mode_scores_each_case_reverts_and_reports(
    em: EditableModel, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    before = weights_digest(em.model)
    out = evaluate(em, cfg, progress=False)
    assert weights_digest(em.model) == before
    assert em.edits() == []  # every edit was rolled back
    unedited = lines(records_path(out, "ZsRE", "unedited", "single"))
    memory = lines(records_path(out, "ZsRE", "memory", "single"))
    assert [r["index"] for r in unedited] == [0, 1, 2] == [r["index"] for r in memory]
    assert len({r["run"] for r in unedited + memory}) == 1  # every line names its run
    for r in unedited:  # nothing changed, so every locality token agrees with itself
        assert all(v == 1.0 for k, v in r["metrics"].items() if k.startswith("locality/"))
    # the stored scores are what the wrapper gives with the case's edit applied, and the
    # counterfactual path ran only for the memory strategy
    assert isinstance(em.counterfactual, CountingPath)
    assert em.counterfactual.entered > 0
    case = load_cases("ZsRE", limit=1)[0]
    req = case.requests[0]
    records = em.edit(list(case.requests))
    expected = em.teacher_forced([req.prompt, *req.rephrase], [req.target_new] * 2)
    em.rollback(records[0].id)
    assert memory[0]["metrics"]["edit_succ"] == pytest.approx(expected[0])
    assert memory[0]["metrics"]["rephrase"] == pytest.approx(expected[1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["seed"] == 0
    assert len(manifest["datasets"]["ZsRE"]["sha256"]) == 64
    assert manifest["strategies"]["memory"] == {"strategy": "memory", "method": "", "options": {}}
    assert "torch" in manifest["versions"]

    paths = write_reports(out)
    md = paths["md"].read_text()
    assert "| Metric | memory | unedited |" in md and "| Edit Succ. |" in md
    rows = list(
        csv.reader(x for x in paths["csv"].read_text().splitlines() if not x.startswith("#"))
    )
    assert rows[0] == ["dataset", "mode", "T", "metric", "strategy", "value", "n"]
    loc = [r for r in rows if r[3] == "Locality" and r[4] == "unedited"]
    assert loc and loc[0][5] == "100.00"
    assert paths["bar:ZsRE"].stat().st_size > 1000
    summary = json.loads(paths["json"].read_text())["summary"]
    assert summary["ZsRE"]["single"]["memory"]["n"] == 3


def counting_strategy(name: str) -> list[int]:
    """Register ``name``: the memory strategy, recording the index of each case it applies."""
    calls: list[int] = []

    class Counting(WrapperStrategy):
        def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Any:
            calls.append(int(requests[0].meta["index"]))
            return super().apply(em, requests)

    register_strategy(name, lambda method, opts: Counting("memory"))
    return calls


def test_an_interrupted_run_resumes_without_recomputing(em: EditableModel, tmp_path: Path) -> None:
    calls = counting_strategy("counting")
    cfg = config(tmp_path, strategies=("counting",), limit=2)
    evaluate(em, cfg, progress=False)
    assert calls == [0, 1]
    path = records_path(Path(cfg.out), "ZsRE", "counting", "single")
    with path.open("a") as f:  # a torn last line, as a kill mid-write leaves it
        f.write('{"dataset": "ZsRE", "ind')
    evaluate(em, config(tmp_path, strategies=("counting",), limit=4), progress=False)
    assert calls == [0, 1, 2, 3]  # 0 and 1 were not recomputed
    assert sorted(r["index"] for r in load_records(Path(cfg.out))) == [0, 1, 2, 3]
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    assert manifest["limit"] == 4  # the manifest says how far the run went
    evaluate(em, config(tmp_path, strategies=("counting",), limit=3), progress=False)
    assert calls == [0, 1, 2, 3]
    assert json.loads((Path(cfg.out) / "manifest.json").read_text())["limit"] == 4
    with pytest.raises(InvalidRequestError, match="different seed"):
        evaluate(em, config(tmp_path, strategies=("counting",), seed=1), progress=False)


def test_a_resume_with_another_worker_count_skips_what_any_rank_did(
    em: EditableModel, tmp_path: Path
) -> None:
    calls = counting_strategy("counting2")
    cfg = config(tmp_path, strategies=("counting2",), limit=4)
    for rank in (0, 1):  # a first sitting with two workers: ranks write their own files
        evaluate(em, cfg, rank=rank, world=2, progress=False)
    assert sorted(calls) == [0, 1, 2, 3]
    out = Path(cfg.out)
    assert records_path(out, "ZsRE", "counting2", "single", 1).is_file()
    pre_files = sorted(p.name for p in (out / "pre").iterdir())
    assert pre_files == ["ZsRE.jsonl", "ZsRE.rank1.jsonl"]
    pre_lines = sum(len(lines(out / "pre" / name)) for name in pre_files)
    evaluate(em, config(tmp_path, strategies=("counting2",), limit=5), progress=False)
    assert sorted(calls) == [0, 1, 2, 3, 4]  # one worker now: only record 4 is new
    assert sum(len(lines(out / "pre" / name)) for name in pre_files) == pre_lines + 1
    assert sorted(r["index"] for r in load_records(out)) == [0, 1, 2, 3, 4]
    # a record scored twice (as sittings before this fix could leave it) is counted once
    rank1 = records_path(out, "ZsRE", "counting2", "single", 1)
    first = rank1.read_text().splitlines()[0]
    records_path(out, "ZsRE", "counting2", "single").open("a").write(first + "\n")
    assert sorted(r["index"] for r in load_records(out)) == [0, 1, 2, 3, 4]
    summary = summarise(load_records(out))
    assert summary["ZsRE"]["single"]["counting2"]["n"] == 5


def test_a_batch_of_in_weight_edits_reverts_as_one(em: EditableModel) -> None:
    assert em.model is not None
    before = weights_digest(em.model)
    strategy = WrapperStrategy("weights", "ft-m", {"layer": 1, "lr": 1e-2, "steps": 2})
    applied = strategy.apply(
        em,
        [
            EditRequest(prompt="Where did Leo Arons die?", target_new="Paris"),
            EditRequest(prompt="Who wrote Faust?", target_new="Goethe"),
        ],
    )
    assert weights_digest(em.model) != before
    applied.revert()  # the first rollback undoes the batch; the second id is then done
    assert weights_digest(em.model) == before and em.edits() == []


def test_a_resumed_run_refuses_records_made_under_other_defaults(
    em: EditableModel, tmp_path: Path
) -> None:
    """The manifest keeps every setting an in-weight strategy resolved to; when a default
    moves (here: the layer, rewritten on disk as a code change would move it), resuming the
    run is refused instead of mixing records of two settings under one name."""
    assert em.model is not None
    spec = "weights:ft-l@lr=0.01;steps=1"
    cfg = config(tmp_path, strategies=(spec,), limit=1)
    evaluate(em, cfg, progress=False)
    path = Path(cfg.out) / "manifest.json"
    manifest = json.loads(path.read_text())
    settings = manifest["settings"][spec]
    assert settings["lr"] == 0.01 and settings["steps"] == 1
    assert isinstance(settings["layers"], list) and len(settings["layers"]) == 1
    assert "settings" not in json.dumps(manifest["strategies"])  # not part of the run id
    write_reports(cfg.out)
    assert f"- layers: {spec} {settings['layers']}" in (Path(cfg.out) / "summary.md").read_text()
    evaluate(em, config(tmp_path, strategies=(spec,), limit=2), progress=False)  # unchanged
    assert len(load_records(Path(cfg.out))) == 2

    other = (settings["layers"][0] + 1) % em.model.config.num_hidden_layers
    manifest["settings"][spec] = {**settings, "layers": [other], "retired_field": 1}
    path.write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequestError, match=r"layers \[\d+\] -> \[\d+\]") as err:
        evaluate(em, config(tmp_path, strategies=(spec,), limit=3), progress=False)
    assert "retired_field" not in str(err.value)  # a field one side lacks is not compared
    assert len(load_records(Path(cfg.out))) == 2  # nothing was added

    # a run from before manifests kept settings resumes, and learns nothing about that spec
    # (what it ran with is unknown); a strategy added to it now has its settings kept
    del manifest["settings"]
    path.write_text(json.dumps(manifest))
    spec2 = "weights:ft-m@lr=0.01;steps=1"
    evaluate(em, config(tmp_path, strategies=(spec, spec2), limit=3), progress=False)
    kept = json.loads(path.read_text())["settings"]
    assert list(kept) == [spec2] and kept[spec2]["neighbour_factor"] == 1.0
    assert len(load_records(Path(cfg.out))) == 6


def test_an_adapter_run_keeps_its_settings_and_refuses_a_moved_default(
    em: EditableModel, tmp_path: Path
) -> None:
    """An adapter strategy's manifest keeps its hyperparameters with the layer its default
    fraction resolved to, so a resumed run whose default moved is refused as an in-weight
    one is; the memory strategy records none (its settings are the wrapper's)."""
    assert em.model is not None
    spec = "adapter:grace@steps=2"
    cfg = config(tmp_path, strategies=("memory", spec), limit=1)
    evaluate(em, cfg, progress=False)
    path = Path(cfg.out) / "manifest.json"
    manifest = json.loads(path.read_text())
    assert list(manifest["settings"]) == [spec]
    settings = manifest["settings"][spec]
    layer = settings["layer"]
    assert isinstance(layer, int) and 0 <= layer < em.model.config.num_hidden_layers
    assert settings["steps"] == 2 and settings["layer_fraction"] == 0.5
    write_reports(cfg.out)
    assert f"- layers: {spec} {layer}" in (Path(cfg.out) / "summary.md").read_text()

    manifest["settings"][spec] = {**settings, "layer": layer + 1}
    path.write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequestError, match=rf"layer {layer + 1} -> {layer}"):
        evaluate(em, config(tmp_path, strategies=("memory", spec), limit=2), progress=False)
    assert len(load_records(Path(cfg.out))) == 2  # one record of each strategy, nothing added


def test_a_revert_that_leaves_weights_changed_is_caught(em: EditableModel, tmp_path: Path) -> None:
    class Sloppy:
        name = "sloppy"

        def config(self) -> dict[str, Any]:
            return {"strategy": "sloppy"}

        def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Any:
            assert em.model is not None
            w = next(em.model.parameters())
            with torch.no_grad():
                w.add_(1e-3)

            class Half:
                def revert(self) -> None:
                    with torch.no_grad():
                        w.sub_(1e-3)  # float rounding: not bit-identical

            return Half()

    register_strategy("sloppy", lambda method, opts: Sloppy())
    with pytest.raises(RevertError, match="weights differ"):
        evaluate(em, config(tmp_path, strategies=("sloppy",), limit=2), progress=False)


# ------------------------------------------------------------------ sequential mode
def test_sequential_mode_scores_all_edits_so_far_at_each_checkpoint(
    em: EditableModel, tmp_path: Path
) -> None:
    cfg = config(tmp_path, strategies=("memory",), limit=4, sequential=3, checkpoints=(1, 3))
    out = evaluate(em, cfg, progress=False)
    got = lines(records_path(out, "ZsRE", "memory", "sequential"))
    assert sorted((r["T"], r["index"]) for r in got) == [(1, 0), (3, 0), (3, 1), (3, 2)]
    assert em.edits() == []
    summary = summarise(load_records(out))
    curve = summary["ZsRE"]["sequential"]["memory"]
    assert set(curve) == {"1", "3"} and curve["3"]["n"] == 3
    paths = write_reports(out)
    assert paths["curve:ZsRE"].stat().st_size > 1000
    assert "sequential, memory" in paths["md"].read_text()


def test_sequential_batches_apply_records_together_and_score_at_batch_ends(
    em: EditableModel, tmp_path: Path
) -> None:
    batches: list[list[int]] = []

    class Recording(WrapperStrategy):
        def apply(self, em: EditableModel, requests: Sequence[EditRequest]) -> Any:
            batches.append([int(r.meta["index"]) for r in requests])
            return super().apply(em, requests)

    register_strategy("recording", lambda method, opts: Recording("memory"))
    assert config(tmp_path, sequential=25, edit_batch=2).curve() == [2, 20, 25]
    cfg = config(
        tmp_path, strategies=("recording",), limit=5, sequential=5, edit_batch=2, checkpoints=(4,)
    )
    assert cfg.curve() == [4, 5]
    out = evaluate(em, cfg, progress=False)
    assert batches == [[0, 1], [2, 3], [4]]
    got = lines(records_path(out, "ZsRE", "recording", "sequential"))
    assert sorted({(r["T"], r["edit_batch"]) for r in got}) == [(4, 2), (5, 2)]
    assert len(got) == 4 + 5 and em.edits() == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["edit_batch"] == 2
    assert "2 records per edit" in write_reports(out)["md"].read_text()
    # two runs' curves on one dataset: RESULTS.md shows them in one figure, side by side
    one = config(tmp_path, strategies=("memory",), limit=2, sequential=2, out=str(tmp_path / "b"))
    other = evaluate(em, one, progress=False)
    results = write_results([out, other], tmp_path / "RESULTS.md").read_text()
    figure = tmp_path / "plots" / "ZsRE-sequential-all.png"
    assert figure.stat().st_size > 1000
    assert f"![ZsRE sequential, all runs]({figure.as_posix()})" in results
    assert "## Sequential editing, all runs side by side" in results
    assert "ZsRE: recording (out, 2 per edit); memory (b)" in results
    alone = write_results([other], tmp_path / "ONE.md").read_text()
    assert "side by side" not in alone  # one curve: nothing to put beside it
    with pytest.raises(InvalidRequestError, match="with edit_batch 2"):
        evaluate(
            em,
            config(tmp_path, strategies=("recording",), limit=5, sequential=5, checkpoints=(4,)),
            progress=False,
        )
    with pytest.raises(InvalidRequestError, match="multiples of edit_batch"):
        config(tmp_path, sequential=6, edit_batch=2, checkpoints=(3,))
    with pytest.raises(InvalidRequestError, match="applies to sequential mode"):
        config(tmp_path, edit_batch=2)


# ------------------------------------------------------------------ every suite, all metrics
@pytest.mark.parametrize("dataset", ["ZsRE", "WikiBio", "ConvSent", "Sanitation", "MQuAKE"])
def test_each_suite_scores_its_metrics_with_generation(
    em: EditableModel, tmp_path: Path, dataset: str
) -> None:
    opts = EvalOptions(fluency_tokens=12, generation=True, max_gen_tokens=4)
    cfg = config(tmp_path, datasets=(dataset,), limit=2, options=opts)
    out = evaluate(em, cfg, progress=False)
    unedited = lines(records_path(out, dataset, "unedited", "single"))
    memory = lines(records_path(out, dataset, "memory", "single"))
    assert len(unedited) == len(memory) == 2
    for rec in unedited + memory:
        m = rec["metrics"]
        assert "fluency" in m and m["fluency"] >= 0.0
        for k, v in m.items():
            if k not in ("fluency", "convsent_kl"):
                assert 0.0 <= v <= 1.0 or math.isnan(v), (k, v)
    first = unedited[0]["metrics"]
    if dataset == "ConvSent":
        assert first["convsent_kl"] == pytest.approx(0.0, abs=1e-6)  # nothing was edited
        assert set(first) == {"convsent_succ", "convsent_kl", "fluency"}
    elif dataset == "Sanitation":
        assert first["sanitation_loc"] == 1.0  # same model, same greedy answers
    else:
        assert "gen.edit_succ" in first
        if dataset != "MQuAKE":
            assert all(v == 1.0 for k, v in first.items() if k.startswith("gen.locality/"))
        else:
            assert "gen.portability/multi_hop" in first
    summary = summarise(load_records(out))[dataset]["single"]
    labels = {r.label for r in suite_for(dataset).rows}
    assert set(summary["memory"]["rows"]) == labels


def test_a_run_on_another_split_reads_that_file_and_says_so(
    em: EditableModel, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path, datasets=("Sanitation",), strategies=("unedited",), limit=2, split="train"
    )
    evaluate(em, cfg, progress=False)
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    entry = manifest["datasets"]["Sanitation"]
    assert entry["split"] == "train" and entry["file"].endswith("trivia_qa_train.json")
    train = load_cases("Sanitation", split="train", limit=2)
    dev = load_cases("Sanitation", limit=2)
    assert train[0].requests[0].prompt != dev[0].requests[0].prompt
    got = sorted(r["index"] for r in load_records(Path(cfg.out)))
    assert got == [0, 1]
    assert "Sanitation (train file, sha256 " in write_reports(cfg.out)["md"].read_text()
    with pytest.raises(InvalidRequestError, match="unknown split 'validation'"):
        config(tmp_path, split="validation")


def test_every_series_of_a_combined_figure_has_its_own_look() -> None:
    from memedit.evaluation.report import _series_style

    looks = [tuple(sorted(_series_style(k).items())) for k in range(40)]
    assert len(set(looks)) == 40  # the eleventh run no longer repeats the first one's line
    assert _series_style(3)["color"] == _series_style(13)["color"] == "C3"
