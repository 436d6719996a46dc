"""KnowEdit fact records load as requests; odd upstream values load, malformed ones are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memedit import InvalidRequestError
from memedit.datasets import FACT_DATASETS, load_requests, record_to_request


@pytest.mark.parametrize("dataset", FACT_DATASETS)
def test_real_dev_files_load(knowedit: Path, dataset: str) -> None:
    reqs = load_requests(dataset, limit=50)
    assert len(reqs) == 50
    assert all(r.prompt and r.target_new for r in reqs)
    assert sum(bool(r.locality) for r in reqs) >= 40
    assert all(r.meta["dataset"] == dataset for r in reqs)


def test_alias_lists_and_string_answers() -> None:
    rec = {
        "subject": "Black Adam",
        "prompt": "The name of the spouse of Black Adam is",
        "target_new": "Henry Bowyer Lane",
        "ground_truth": "Isis",
        "portability": {
            "Reasoning": [
                {
                    "prompt": "The gender of the spouse of Black Adam is",
                    "ground_truth": [["male", "man"]],
                }
            ]
        },
        "locality": {
            "Relation_Specificity": [
                {"prompt": "The gender of Black Adam is", "ground_truth": ["male"]}
            ]
        },
    }
    req = record_to_request("WikiData_counterfact", rec)
    assert req.ground_truth == ("Isis",)
    assert req.portability[0].answers == ("male", "man")
    assert req.portability[0].kind == "Reasoning"
    assert req.locality[0].answers == ("male",)


def test_subject_missing_from_prompt_is_kept_in_meta() -> None:
    req = record_to_request("ZsRE", {"subject": "Q", "prompt": "Who is it?", "target_new": "X"})
    assert req.subject == ""
    assert req.meta["subject"] == "Q"


def test_malformed_record_names_file_index_and_field(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    good = {"prompt": "Who?", "target_new": "X"}
    bad = {"prompt": "Who?", "target_new": 7}
    (tmp_path / "dev" / "ZsRE.json").write_text(json.dumps([good, bad]))
    with pytest.raises(InvalidRequestError) as info:
        load_requests("ZsRE", root=tmp_path)
    text = str(info.value)
    assert "ZsRE.json" in text and "record 1" in text and "target_new" in text
    with pytest.raises(InvalidRequestError, match="not a fact dataset"):
        load_requests("NoSuchSet", root=tmp_path)
