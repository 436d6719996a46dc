"""``EvalOptions(unrelated="nq")``: the WISE paper's locality on unrelated Natural Questions
beside KnowEdit's, one question per case from the ZsRE train file's records 64 on; off, runs
are exactly what they were. A tiny random model and real KnowEdit records."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from memedit import InvalidRequestError
from memedit.datasets import load_cases, resolve_dataset_file
from memedit.editable import EditableModel
from memedit.evaluation import EvalOptions, evaluate, summarise, write_reports, write_results
from memedit.evaluation.report import load_records
from memedit.evaluation.runner import config_from_dict, config_to_dict, records_path
from memedit.evaluation.suites import FactSuite
from memedit.evaluation.unrelated import (
    TRAIN_POOL,
    unrelated_manifest,
    unrelated_probe,
    unrelated_source,
)
from memedit.paths import file_sha256

from .test_evaluation import FAST, config, lines
from .test_evaluation import em as em  # the tiny wrapped model fixture

NQ = dataclasses.replace(FAST, unrelated="nq")


def nq_records() -> list[dict[str, Any]]:
    """The ZsRE train file as it is on disk (MEND format: ``loc``/``loc_ans``)."""
    data = json.loads(resolve_dataset_file("ZsRE", "train").read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


def test_options_off_give_todays_dict_and_a_bad_source_is_named() -> None:
    today = {
        "fluency_tokens": 100,
        "fluency_top_k": 5,
        "generation": True,
        "gen_margin": 4,
        "max_gen_tokens": 96,
    }
    assert EvalOptions().to_dict() == today == EvalOptions(unrelated=None).to_dict()
    assert EvalOptions(unrelated="nq").to_dict() == {**today, "unrelated": "nq"}
    with pytest.raises(InvalidRequestError, match=r"'squad'.*\['nq'\]") as err:
        EvalOptions(unrelated="squad")
    assert err.value.field == "unrelated"
    cfg = config(Path("unused"), options=NQ)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_each_case_gets_the_question_of_record_64_plus_its_index_mod_200() -> None:
    raw = nq_records()
    n = len(raw)
    assert n > TRAIN_POOL == 64
    assert unrelated_source("nq") is unrelated_source("nq")  # read once per process
    for i in (0, 1, 5, n - TRAIN_POOL - 1, n - TRAIN_POOL, 1000):
        record = raw[TRAIN_POOL + i % (n - TRAIN_POOL)]
        probe = unrelated_probe("nq", i)
        assert probe.prompt == record["loc"] and probe.answers == (record["loc_ans"],)
        assert probe.kind == "NQ"
    manifest = unrelated_manifest("nq")
    assert manifest["records"] == [TRAIN_POOL, n - 1]
    assert manifest["sha256"] == file_sha256(resolve_dataset_file("ZsRE", "train"))

    class Recorder:  # the suite's calls on the model: prompts and targets it scores
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []

        def predicted_tokens(self, prompts: Sequence[str], targets: Sequence[str]) -> list[Any]:
            self.asked += zip(prompts, targets, strict=True)
            return [[1] for _ in prompts]

    case = load_cases("ZsRE", limit=1)[0]
    for index in (0, 7, 237):
        rec = Recorder()
        pre = FactSuite().pre(rec, dataclasses.replace(case, index=index), NQ)  # type: ignore[arg-type]
        record = raw[TRAIN_POOL + index % (n - TRAIN_POOL)]
        assert rec.asked[-1] == (record["loc"], record["loc_ans"])
        assert pre["unrelated_tokens"] == [1]
        assert "unrelated_tokens" not in FactSuite().pre(Recorder(), case, FAST)  # type: ignore[arg-type]


def test_off_nothing_changes_on_the_unrelated_row_is_scored_apart(
    em: EditableModel, tmp_path: Path
) -> None:
    gen = EvalOptions(fluency_tokens=0, generation=True, max_gen_tokens=4)
    off = evaluate(em, config(tmp_path / "off", limit=2, options=gen), progress=False)
    on_opts = dataclasses.replace(gen, unrelated="nq")
    on = evaluate(em, config(tmp_path / "on", limit=2, options=on_opts), progress=False)
    assert "unrelated" not in json.loads((off / "manifest.json").read_text())
    for spec in ("unedited", "memory"):
        before = lines(records_path(off, "ZsRE", spec, "single"))
        after = lines(records_path(on, "ZsRE", spec, "single"))
        for b, a in zip(before, after, strict=True):
            assert not any("unrelated" in k for k in b["metrics"])
            extra = {k: a["metrics"].pop(k) for k in ("unrelated/NQ", "gen.unrelated/NQ")}
            assert a["metrics"] == b["metrics"]  # KnowEdit's numbers are untouched
            assert all(0.0 <= v <= 1.0 for v in extra.values())
            if spec == "unedited":  # nothing changed: every token and answer agrees
                assert extra == {"unrelated/NQ": 1.0, "gen.unrelated/NQ": 1.0}

    manifest = json.loads((on / "manifest.json").read_text())
    assert manifest["options"]["unrelated"] == "nq"
    assert manifest["unrelated"] == unrelated_manifest("nq")
    rows = summarise(load_records(on))["ZsRE"]["single"]["unedited"]["rows"]
    assert rows["Locality (unrelated)"] == 100.0 == rows["Locality (unrelated, generation)"]
    md = write_reports(on)["md"].read_text()
    assert "| Locality (unrelated) | " in md and "- unrelated locality: nq, " in md
    assert "Locality (unrelated)" not in write_reports(off)["md"].read_text()
    results = write_results([on], tmp_path / "RESULTS.md").read_text()
    row = next(x for x in results.splitlines() if x.startswith("| Locality (unrelated) |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[2] == "100.00"  # columns: memory, unedited (ours), then the references
    assert len(cells) > 3 and all(c == "" for c in cells[3:])  # KnowEdit has no such figure

    with pytest.raises(InvalidRequestError, match="different options"):
        evaluate(em, config(tmp_path / "on", limit=2, options=gen), progress=False)
    manifest["unrelated"]["sha256"] = "0" * 64  # as if the train file had changed since
    (on / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequestError, match="unrelated probes' file changed"):
        evaluate(em, config(tmp_path / "on", limit=2, options=on_opts), progress=False)


def test_sequential_checkpoints_score_the_unrelated_probe(
    em: EditableModel, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path, strategies=("unedited", "memory"), limit=3, sequential=3, checkpoints=(1, 3)
    )
    out = evaluate(em, dataclasses.replace(cfg, options=NQ), progress=False)
    pre = lines(out / "pre" / "ZsRE.jsonl")
    assert all("unrelated_tokens" in item["pre"] for item in pre)
    for spec in ("unedited", "memory"):
        got = lines(records_path(out, "ZsRE", spec, "sequential"))
        assert sorted((r["T"], r["index"]) for r in got) == [(1, 0), (3, 0), (3, 1), (3, 2)]
        assert all(0.0 <= r["metrics"]["unrelated/NQ"] <= 1.0 for r in got)
        if spec == "unedited":
            assert all(r["metrics"]["unrelated/NQ"] == 1.0 for r in got)
    curve = summarise(load_records(out))["ZsRE"]["sequential"]["unedited"]
    assert curve["3"]["rows"]["Locality (unrelated)"] == 100.0
    assert "| Locality (unrelated) |" in write_reports(out)["md"].read_text()
