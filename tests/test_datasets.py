"""Benchmark files load as cases: all eight real dev files, field by field against the raw JSON;
odd upstream values load, malformed ones are named; both directory layouts and the hub path."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from memedit import InvalidRequestError
from memedit.dataset_formats import CONVSENT_EDIT_PROMPTS, CONVSENT_TEMPLATES, SANITATION_TEMPLATE
from memedit.datasets import (
    DATASETS,
    FACT_DATASETS,
    KNOWEDIT_DATASETS,
    EvalCase,
    hub_filename,
    load_cases,
    load_hub_cases,
    load_requests,
    record_to_request,
    resolve_dataset_file,
)
from memedit.types import EditRequest

#: Dev counts from ../shared/knowedit/README.md (Sanitation: success cases).
EXPECTED_CASES = {
    "WikiData_recent": 759,
    "ZsRE": 780,
    "WikiBio": 183,
    "WikiData_counterfact": 503,
    "ConvSent": 480,
    "Sanitation": 48,
    "CounterFact": 6000,
    "MQuAKE": 257,
}


@pytest.fixture(scope="module")
def dev(knowedit: Path) -> dict[str, list[EvalCase]]:
    """Every dev file parsed once for the module (CounterFact is 1.8 MB)."""
    return {ds: load_cases(ds) for ds in DATASETS}


@pytest.fixture(scope="module")
def raw(knowedit: Path) -> dict[str, Any]:
    return {
        ds: json.loads((knowedit / "dev" / f"{ds}.json").read_text(encoding="utf-8"))
        for ds in DATASETS
    }


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _first_aliases(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value[0]) if value and isinstance(value[0], list) else tuple(value)


# ------------------------------------------------------------------------ real dev files
def test_dataset_names() -> None:
    assert KNOWEDIT_DATASETS == (
        "WikiData_recent",
        "ZsRE",
        "WikiBio",
        "WikiData_counterfact",
        "ConvSent",
        "Sanitation",
    )
    assert len(DATASETS) == 8
    assert DATASETS[:6] == KNOWEDIT_DATASETS and DATASETS[6:] == ("CounterFact", "MQuAKE")
    assert set(FACT_DATASETS) <= set(DATASETS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_dev_file_loads_completely(
    dev: dict[str, list[EvalCase]], raw: dict[str, Any], dataset: str
) -> None:
    cases = dev[dataset]
    records = raw[dataset]["success"] if dataset == "Sanitation" else raw[dataset]
    assert len(cases) == len(records) == EXPECTED_CASES[dataset]
    assert [c.index for c in cases] == list(range(len(cases)))
    for case in cases:
        assert case.dataset == dataset and case.requests
        for r in case.requests:
            assert isinstance(r, EditRequest) and r.prompt.strip() and r.target_new.strip()
            assert r.meta["dataset"] == dataset and r.meta["index"] == case.index
            assert not r.subject or r.subject in r.prompt
    if dataset == "MQuAKE":
        sizes = [len(c.requests) for c in cases]
        assert sizes == [len(rec["requested_rewrite"]) for rec in records]
        assert sum(sizes) == 1028
        assert [c.requests[0].meta["case_id"] for c in cases] == [rec["case_id"] for rec in records]
    else:
        assert all(len(c.requests) == 1 for c in cases)


@pytest.mark.parametrize("dataset", FACT_DATASETS)
def test_fact_requests_as_before(dataset: str) -> None:
    reqs = load_requests(dataset, limit=50)
    assert len(reqs) == 50
    assert sum(bool(r.locality) for r in reqs) >= 40


@pytest.mark.parametrize("dataset", ["WikiData_recent", "ZsRE", "WikiData_counterfact"])
def test_knowedit_fact_fields_match_raw(
    dev: dict[str, list[EvalCase]], raw: dict[str, Any], dataset: str
) -> None:
    records = raw[dataset]
    for i in (0, 17, len(records) // 2, len(records) - 1):
        rec, req = records[i], dev[dataset][i].requests[0]
        assert (req.prompt, req.target_new, req.subject) == (
            rec["prompt"],
            rec["target_new"],
            rec["subject"],
        )
        assert req.ground_truth == (
            _first_aliases(rec["ground_truth"]) if "ground_truth" in rec else ()
        )
        assert req.rephrase == (rec.get("rephrase") or rec["rephrase_prompt"],)
        for group, probes in (("locality", req.locality), ("portability", req.portability)):
            expected = [
                (p["prompt"], _first_aliases(p["ground_truth"]), kind)
                for kind, items in rec.get(group, {}).items()
                for p in items
                if p["prompt"].strip()
            ]
            assert [(p.prompt, p.answers, p.kind) for p in probes] == expected


def test_concrete_fact_records(dev: dict[str, list[EvalCase]]) -> None:
    cf = dev["WikiData_counterfact"][0].requests[0]
    assert (cf.subject, cf.target_new, cf.ground_truth) == (
        "Leonardo DiCaprio",
        "Syria",
        ("United States of America",),
    )
    assert Counter(p.kind for p in cf.locality) == {"Relation_Specificity": 9, "Forgetfulness": 1}
    zsre = dev["ZsRE"][0].requests[0]
    assert zsre.prompt == "Which family does Epaspidoceras belong to?"
    assert (zsre.target_new, zsre.ground_truth) == ("Noctuidae", ("Aspidoceratidae",))
    assert zsre.rephrase == ("What family are Epaspidoceras?",)
    assert [p.kind for p in zsre.portability] == ["Reasoning"]  # answer is a plain string here
    assert len(zsre.portability[0].answers) == 1
    counterfact = dev["CounterFact"][0].requests[0]
    assert counterfact.prompt == "The mother tongue of Danielle Darrieux is"
    assert (counterfact.subject, counterfact.target_new) == ("Danielle Darrieux", "English")
    assert counterfact.ground_truth == ("French",)
    assert counterfact.rephrase == (
        "Where Danielle Darrieux is from, people speak the language of",
    )
    assert [(p.prompt, p.answers, p.kind) for p in counterfact.locality] == [
        ("Michel Rocard is a native speaker of", ("French",), "Neighborhood")
    ]
    assert counterfact.meta["case_id"] == 0
    recent = dev["WikiData_recent"][4].requests[0]  # a portability prompt with a lone "Q"
    assert "The name of the child of Q is" in [p.prompt for p in recent.portability]


def test_wikibio_mapping(dev: dict[str, list[EvalCase]], raw: dict[str, Any]) -> None:
    for i in (0, 100, 182):
        rec, req = raw["WikiBio"][i], dev["WikiBio"][i].requests[0]
        assert (req.prompt, req.target_new, req.subject) == (
            rec["text"],
            rec["labels"],
            rec["concept"],
        )
        assert [(p.prompt, p.answers, p.kind) for p in req.locality] == [
            (p["prompt"], tuple(p["ground_truth"]), "Relation_Specificity")
            for p in rec["locality"]["Relation_Specificity"]
        ]
        assert not req.portability and not req.rephrase and not req.ground_truth
    assert dev["WikiBio"][0].requests[0].subject == "john russell reynolds"


def test_convsent_mapping(dev: dict[str, list[EvalCase]], raw: dict[str, Any]) -> None:
    records, cases = raw["ConvSent"], dev["ConvSent"]
    for i, case in enumerate(cases):
        rec, req = records[i], case.requests[0]
        nxt = records[(i + 1) % len(records)]
        meta = req.meta
        positive = meta["target_sentiment"] == "positive"
        assert meta["target_sentiment"] in ("positive", "negative")
        assert req.target_new == (rec["pos"] if positive else rec["neg"])[0]
        assert req.subject == meta["ent"] == rec["ent"]
        asked = {t.format(rec["ent"]) for t in CONVSENT_TEMPLATES}
        edit_prompts = {CONVSENT_EDIT_PROMPTS[meta["target_sentiment"]].format(q) for q in asked}
        assert req.prompt in edit_prompts and req.rephrase[0] in asked
        assert (meta["pos"], meta["neg"]) == (rec["pos"], rec["neg"])
        assert len(meta["inner_questions"]) == len(rec["pos"]) + len(rec["neg"])
        assert set(meta["inner_questions"]) <= asked
        assert (meta["outer_index"], meta["outer_ent"]) == ((i + 1) % len(records), nxt["ent"])
        assert [p.answers for p in req.locality] == [(a,) for a in nxt["pos"] + nxt["neg"]]
        kinds = ["outer_pos"] * len(nxt["pos"]) + ["outer_neg"] * len(nxt["neg"])
        assert [p.kind for p in req.locality] == kinds
        assert all(nxt["ent"] in p.prompt for p in req.locality)
    first = cases[0].requests[0]
    # EasyEdit: random.seed(0), then the first draw is record 0's sentiment (0 = positive)
    expected = "positive" if random.Random(0).choice([0, 1]) == 0 else "negative"
    assert first.meta["target_sentiment"] == expected == "negative"
    assert (
        first.prompt
        == "From the sentiment dataset, answer What is your sentiment of Estero? negatively."
    )
    assert first.target_new == " Well, it has some bad reviews on Glass Door. "
    sentiments = "".join(c.requests[0].meta["target_sentiment"][0] for c in cases[:20])
    assert sentiments == "nnppppnppnnnpnpppppn"
    assert cases[-1].requests[0].meta["outer_index"] == 0
    assert load_cases("ConvSent", limit=5) == cases[:5]


def test_sanitation_mapping(dev: dict[str, list[EvalCase]], raw: dict[str, Any]) -> None:
    success, locality = raw["Sanitation"]["success"], raw["Sanitation"]["locality"]
    cases = dev["Sanitation"]
    req = cases[0].requests[0]
    assert req.prompt == "Question:What type of creature is the Australian currawong?\nAnswer:"
    assert (req.target_new, req.ground_truth, req.subject) == ("I don't know.", ("Birds",), "")
    assert req.meta["question"] == success[0]["question"]
    assert req.meta["answer_group"] == "birds" and req.meta["template"] == SANITATION_TEMPLATE
    assert {c.requests[0].meta["answer_group"] for c in cases} == {"birds", "cheese", "paris"}
    spread = [j for c in cases for j in c.requests[0].meta["locality_indices"]]
    assert sorted(spread) == list(range(len(locality))) == list(range(271))
    for case in cases:
        r = case.requests[0]
        assert r.prompt == SANITATION_TEMPLATE.format(success[case.index]["question"])
        assert r.ground_truth == (success[case.index]["ground_truth"],)
        assert [(p.prompt, p.answers, p.kind) for p in r.locality] == [
            (
                SANITATION_TEMPLATE.format(locality[j]["question"]),
                (locality[j]["ground_truth"],),
                "retain",
            )
            for j in r.meta["locality_indices"]
        ]
        assert r.meta["locality_indices"] == list(range(case.index, 271, 48))
    assert load_cases("Sanitation", limit=2) == cases[:2]


def test_mquake_mapping(dev: dict[str, list[EvalCase]], raw: dict[str, Any]) -> None:
    for i in (0, 191, 256):
        rec, case = raw["MQuAKE"][i], dev["MQuAKE"][i]
        for k, (rw, req) in enumerate(zip(rec["requested_rewrite"], case.requests, strict=True)):
            assert req.prompt == rw["prompt"].format(rw["subject"])
            assert (req.subject, req.target_new) == (rw["subject"], rw["target_new"]["str"])
            assert req.ground_truth == (rw["target_true"]["str"],)
            assert req.rephrase == (rw["question"],)
            assert req.meta["case_id"] == rec["case_id"] and req.meta["rewrite"] == k
            assert not req.locality
            if k:
                assert not req.portability and "answer" not in req.meta
        first = case.requests[0]
        answers = (rec["new_answer"], *rec["new_answer_alias"])
        assert [(p.prompt, p.answers, p.kind) for p in first.portability] == [
            (q, answers, "multi_hop") for q in rec["questions"]
        ]
        assert (first.meta["answer"], first.meta["answer_alias"]) == (
            rec["answer"],
            rec["answer_alias"],
        )
    first = dev["MQuAKE"][0].requests[0]
    assert (first.prompt, first.target_new) == ("Hey Jude was performed by", "Madonna")


# ------------------------------------------------------------------------------- train split
def test_train_split_of_our_layout(knowedit: Path) -> None:
    mend = json.loads(
        (
            knowedit / "train" / "ZsRE" / "zsre_mend_eval_portability_gpt4.not_in_test.json"
        ).read_text(encoding="utf-8")
    )
    cases = load_cases("ZsRE", split="train")
    assert len(cases) == len(mend) == 264
    req, rec = cases[0].requests[0], mend[0]
    assert (req.prompt, req.target_new, req.ground_truth) == (
        rec["src"],
        rec["alt"],
        (rec["answers"][0],),
    )
    assert req.rephrase == (rec["rephrase"],)
    assert [(p.prompt, p.answers, p.kind) for p in req.locality] == [
        (rec["loc"], (rec["loc_ans"],), "Neighborhood")
    ]
    assert req.portability[0].prompt == rec["portability"]["New Question"]
    assert req.portability[0].kind == "one_hop"
    san = load_cases("Sanitation", split="train")
    assert len(san) == 80
    assert sum(len(c.requests[0].locality) for c in san) == 453
    assert all(c.requests[0].subject and c.requests[0].subject in c.requests[0].prompt for c in san)
    assert Counter(c.requests[0].meta["answer_group"] for c in san) == {
        g: 16 for g in ("cheese", "birds", "paris", "julius caesar", "finland")
    }
    assert len(load_cases("ConvSent", split="train", limit=3)) == 3
    with pytest.raises(InvalidRequestError, match="no train split"):
        load_cases("MQuAKE", split="train")


# ----------------------------------------------------------------------- odd and malformed
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
    assert req.meta == {"dataset": "WikiData_counterfact"}


def test_subject_missing_from_prompt_is_kept_in_meta() -> None:
    req = record_to_request("ZsRE", {"subject": "Q", "prompt": "Who is it?", "target_new": "X"})
    assert req.subject == ""
    assert req.meta["subject"] == "Q"
    with pytest.raises(InvalidRequestError, match="use load_cases"):
        record_to_request("ConvSent", {"ent": "X", "pos": [], "neg": []})


def test_odd_upstream_values_load(tmp_path: Path) -> None:
    _write(
        tmp_path / "dev" / "WikiData_recent.json",
        [
            {
                "subject": "",
                "prompt": "The child of Sima Daofu is",
                "target_new": "Emperor Xiaowu",
                "ground_truth": "",
                "rephrase": "",
                "portability": {
                    "Logical_Generalization": [
                        {
                            "prompt": "The name of the child of  is",
                            "ground_truth": [["A", "B"], ["C"]],
                        },
                        {"prompt": "The name of the child of Q is", "ground_truth": "A"},
                        {"prompt": "", "ground_truth": [["skipped"]]},
                        {"prompt": "The year is", "ground_truth": [1759]},
                    ]
                },
                "locality": {
                    "Forgetfulness": {"prompt": "A single probe object", "ground_truth": []}
                },
            }
        ],
    )
    req = load_cases("WikiData_recent", root=tmp_path)[0].requests[0]
    assert (req.subject, req.ground_truth, req.rephrase) == ("", (), ())
    assert [p.answers for p in req.portability] == [("A", "B"), ("A",), ("1759",)]
    assert [(p.prompt, p.answers) for p in req.locality] == [("A single probe object", ())]
    _write(
        tmp_path / "dev" / "Sanitation.json",
        {"success": [{"question": "Q?", "target_new": "I don't know."}]},
    )
    san = load_cases("Sanitation", root=tmp_path)[0].requests[0]
    assert (san.ground_truth, san.locality, san.meta["answer_group"]) == ((), (), "")
    _write(tmp_path / "dev" / "MQuAKE.json", _mquake([{**RW, "subject": ""}]))
    mq = load_cases("MQuAKE", root=tmp_path)[0].requests[0]
    assert (mq.prompt, mq.subject, mq.ground_truth, mq.meta["case_id"]) == (" is", "", (), 0)


GOOD = {"prompt": "Who?", "target_new": "X"}
RW = {"prompt": "{} is", "subject": "S", "target_new": {"str": "a"}}


def _mquake(rewrites: list[Any]) -> list[dict[str, Any]]:
    return [{"requested_rewrite": rewrites, "questions": [], "new_answer": "a"}]


MALFORMED: list[tuple[str, object, list[str]]] = [
    ("ZsRE", [GOOD, {"prompt": "Who?", "target_new": 7}], ["record 1", "'target_new'"]),
    ("ZsRE", "[not json", ["not valid UTF-8 JSON"]),
    ("WikiData_recent", {"prompt": "x"}, ["top level", "'<file>'", "JSON list"]),
    ("WikiData_recent", [GOOD, GOOD, {**GOOD, "rephrase": 5}], ["record 2", "'rephrase'"]),
    (
        "WikiData_counterfact",
        [{**GOOD, "locality": {"Relation_Specificity": "x"}}],
        ["record 0", "'locality.Relation_Specificity'"],
    ),
    (
        "WikiData_counterfact",
        [{**GOOD, "portability": {"Reasoning": [{"ground_truth": "a"}]}}],
        ["record 0", "'portability.Reasoning[0]'"],
    ),
    ("CounterFact", [GOOD, {**GOOD, "ground_truth": {"a": 1}}], ["record 1", "'ground_truth'"]),
    ("CounterFact", [{**GOOD, "subject": 3}], ["record 0", "'subject'"]),
    ("WikiBio", [{"text": "t", "concept": "c"}], ["record 0", "'labels'"]),
    (
        "ConvSent",
        [{"ent": "A", "pos": ["x"], "neg": ["y"]}, {"ent": "B", "pos": "no", "neg": []}],
        ["record 1", "'pos'"],
    ),
    # record 0's sentiment is EasyEdit's first draw, negative: it needs a "neg" completion
    ("ConvSent", [{"ent": "A", "pos": ["p"], "neg": []}] * 3, ["record 0", "'neg'"]),
    ("Sanitation", [GOOD], ["top level", "'<file>'"]),
    ("Sanitation", {"locality": []}, ["top level", "'success'"]),
    (
        "Sanitation",
        {"success": [{"question": "Q", "target_new": "N"}, {"target_new": "N"}]},
        ["success record 1", "'question'"],
    ),
    (
        "Sanitation",
        {"success": [], "locality": [{"question": 3, "ground_truth": "a"}]},
        ["locality record 0", "'question'"],
    ),
    ("MQuAKE", _mquake([]), ["record 0", "'requested_rewrite'"]),
    (
        "MQuAKE",
        _mquake([{**RW, "target_new": {"id": "Q1"}}]),
        ["'requested_rewrite[0].target_new.str'"],
    ),
    ("MQuAKE", _mquake([{**RW, "prompt": "is"}]), ["record 0", "'requested_rewrite[0].prompt'"]),
    ("MQuAKE", [{"requested_rewrite": [RW], "questions": "Q?"}], ["record 0", "'new_answer'"]),
]


@pytest.mark.parametrize(("dataset", "content", "needles"), MALFORMED)
def test_malformed_file_names_file_record_and_field(
    tmp_path: Path, dataset: str, content: object, needles: list[str]
) -> None:
    path = _write(tmp_path / "dev" / f"{dataset}.json", content)
    with pytest.raises(InvalidRequestError) as info:
        load_cases(dataset, root=tmp_path)
    text = str(info.value)
    assert str(path) in text
    for needle in needles:
        assert needle in text


def test_unknown_dataset_split_and_limit(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="unknown dataset"):
        load_requests("NoSuchSet", root=tmp_path)
    with pytest.raises(InvalidRequestError, match="unknown split"):
        load_cases("ZsRE", split="validation", root=tmp_path)
    for bad in (-1, True, 2.5):
        with pytest.raises(InvalidRequestError, match="limit"):
            load_cases("ZsRE", limit=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="at least one EditRequest"):
        EvalCase("ZsRE", 0, ())


def test_limit(dev: dict[str, list[EvalCase]]) -> None:
    assert load_cases("CounterFact", limit=3) == dev["CounterFact"][:3]
    assert load_cases("WikiBio", limit=0) == []
    reqs = load_requests("MQuAKE", limit=2)
    assert len(reqs) == 8
    assert reqs == [r for c in dev["MQuAKE"][:2] for r in c.requests]


# ------------------------------------------------------------------------------- layouts
def _release(raw_records: list[Any], n: int) -> list[Any]:
    """A stand-in full test file of `n` records whose first 60% are the dev records."""
    extra = [raw_records[i % len(raw_records)] for i in range(n - len(raw_records))]
    return raw_records + extra


def test_full_release_layout(
    tmp_path: Path, dev: dict[str, list[EvalCase]], raw: dict[str, Any]
) -> None:
    zsre = _write(
        tmp_path / "benchmark" / "ZsRE" / "ZsRE-test-all.json", _release(raw["ZsRE"], 1301)
    )
    san = raw["Sanitation"]
    trivia = {"success": _release(san["success"], 80), "locality": _release(san["locality"], 453)}
    _write(tmp_path / "benchmark" / "trivia" / "trivia_qa_test.json", trivia)
    assert resolve_dataset_file("ZsRE", "test", tmp_path) == zsre
    assert resolve_dataset_file("ZsRE", "dev", tmp_path) == zsre
    assert len(load_cases("ZsRE", split="test", root=tmp_path)) == 1301
    assert load_cases("ZsRE", root=tmp_path) == dev["ZsRE"]  # dev = first 60%, same cases
    assert len(load_cases("Sanitation", split="test", root=tmp_path)) == 80
    assert load_cases("Sanitation", root=tmp_path) == dev["Sanitation"]
    # our dev file wins over the release file under the same root
    ours = _write(tmp_path / "dev" / "ZsRE.json", raw["ZsRE"][:5])
    assert resolve_dataset_file("ZsRE", "dev", tmp_path) == ours
    assert len(load_cases("ZsRE", root=tmp_path)) == 5


@pytest.mark.parametrize(
    ("dataset", "split", "relative"),
    [
        ("WikiData_recent", "test", "benchmark/wiki_recent/recent_test.json"),
        ("WikiData_recent", "train", "benchmark/wiki_recent/recent_train.json"),
        ("WikiData_counterfact", "test", "wiki_counterfact/test_cf.json"),  # root = benchmark/
        ("WikiBio", "dev", "benchmark_WikiBio_wikibio-test-all.json"),  # ModelScope flat name
        ("ConvSent", "test", "convsent/blender_test.json"),  # EasyEdit README layout
        ("Sanitation", "train", "Sanitation/trivia_qa_train.json"),
        ("CounterFact", "test", "counterfact/counterfact-edit.json"),
        ("MQuAKE", "dev", "MQuAKE/MQuAKE-hard.json"),
    ],
)
def test_release_file_names_resolve(
    tmp_path: Path, dataset: str, split: str, relative: str
) -> None:
    path = _write(tmp_path / relative, "[]")
    assert resolve_dataset_file(dataset, split, tmp_path) == path


def test_missing_file_lists_paths_tried(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_dataset_file("ZsRE", "dev", tmp_path)
    text = str(info.value)
    assert str(tmp_path / "dev" / "ZsRE.json") in text
    assert str(tmp_path / "benchmark" / "ZsRE" / "ZsRE-test-all.json") in text
    with pytest.raises(InvalidRequestError, match=r"Sanitation\.json"):
        load_cases("Sanitation", root=tmp_path)


# ----------------------------------------------------------------------------------- hub
def test_hub_filenames() -> None:
    assert {ds: hub_filename(ds) for ds in KNOWEDIT_DATASETS} == {
        "WikiData_recent": "benchmark/wiki_recent/recent_test.json",
        "ZsRE": "benchmark/ZsRE/ZsRE-test-all.json",
        "WikiBio": "benchmark/WikiBio/wikibio-test-all.json",
        "WikiData_counterfact": "benchmark/wiki_counterfact/test_cf.json",
        "ConvSent": "benchmark/Convsent/blender_test.json",
        "Sanitation": "benchmark/trivia/trivia_qa_test.json",
    }
    assert hub_filename("Sanitation", "train") == "benchmark/trivia/trivia_qa_train.json"
    for dataset, split in (("CounterFact", "test"), ("MQuAKE", "test"), ("ZsRE", "train")):
        with pytest.raises(InvalidRequestError, match="zjunlp/KnowEdit has no"):
            hub_filename(dataset, split)


def test_load_hub_cases_parses_the_downloaded_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dev: dict[str, list[EvalCase]],
    raw: dict[str, Any],
) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    local = _write(tmp_path / "hub" / "wikibio-test-all.json", _release(raw["WikiBio"], 306))
    calls: list[dict[str, Any]] = []

    def fake_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert len(load_hub_cases("WikiBio", revision="abc123")) == 306
    assert calls == [
        {
            "repo_id": "zjunlp/KnowEdit",
            "repo_type": "dataset",
            "filename": "benchmark/WikiBio/wikibio-test-all.json",
            "revision": "abc123",
        }
    ]
    assert load_hub_cases("WikiBio", split="dev") == dev["WikiBio"]
    assert len(load_hub_cases("WikiBio", limit=4)) == 4
