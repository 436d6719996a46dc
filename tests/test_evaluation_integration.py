"""The evaluator end to end on the packaged default model and real KnowEdit records: the
memory strategy flips answers that the unedited model gets wrong, leaves the model's weights
bit-identical, and records split across two worker processes merge into one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memedit.evaluation import EvalConfig, EvalOptions, run_eval, summarise, write_reports
from memedit.evaluation.report import load_records
from memedit.evaluation.runner import records_path

pytestmark = pytest.mark.integration

OPTS = EvalOptions(fluency_tokens=0, generation=True)


def test_memory_strategy_flips_zsre_answers_and_reverts_exactly(tmp_path: Path) -> None:
    config = EvalConfig(
        datasets=("ZsRE",),
        strategies=("unedited", "memory"),
        limit=4,
        out=str(tmp_path / "out"),
        options=OPTS,
        verify_revert="all",  # every revert checked against the weights digest
    )
    out = run_eval(config, progress=False)
    rows = summarise(load_records(out))["ZsRE"]["single"]
    memory, unedited = rows["memory"]["rows"], rows["unedited"]["rows"]
    # the unedited model does not know the new targets; with the edit in memory it answers them
    assert unedited["Edit Succ. (generation)"] == 0.0
    assert memory["Edit Succ. (generation)"] >= 75.0
    assert memory["Edit Succ."] >= 90.0 > unedited["Edit Succ."]
    assert unedited["Locality"] == 100.0
    assert memory["Locality"] >= 75.0
    assert rows["memory"]["n"] == 4 and rows["memory"]["errors"] == 0
    paths = write_reports(out)
    assert "| Edit Succ. (generation) |" in paths["md"].read_text()


def test_records_split_across_two_workers_merge_into_one_report(tmp_path: Path) -> None:
    config = EvalConfig(
        datasets=("WikiBio",),
        strategies=("memory",),
        limit=4,
        out=str(tmp_path / "out"),
        options=EvalOptions(fluency_tokens=0, generation=False),
        workers=2,
    )
    out = run_eval(config, progress=False)
    rank0 = records_path(out, "WikiBio", "memory", "single", 0)
    rank1 = records_path(out, "WikiBio", "memory", "single", 1)
    assert [json.loads(x)["index"] for x in rank0.read_text().splitlines()] == [0, 2]
    assert [json.loads(x)["index"] for x in rank1.read_text().splitlines()] == [1, 3]
    summary = summarise(load_records(out))["WikiBio"]["single"]["memory"]
    assert summary["n"] == 4 and summary["rows"]["Edit Succ."] >= 90.0
