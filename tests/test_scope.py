"""Unit tests of the scope classifier: features, head file, classifier API, tiny training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memedit.errors import InvalidRequestError
from memedit.scope import (
    MiniLMScopeClassifier,
    ScopeClassifier,
    ScopeHead,
    ScopeHeadError,
    load_scope_classifier,
)
from memedit.scope.data import Pair, build_pairs, load_train_records, parse_record, views
from memedit.scope.encoder import Encoded, TokenEncoder
from memedit.scope.features import (
    SCALAR_FEATURES,
    content_words,
    edit_side,
    n_features,
    pair_features,
    subject_spans,
    token_mask,
)
from memedit.types import EditRequest, Probe

LEO = EditRequest(
    prompt="The place of death of Leo Arons is",
    target_new="Berlin",
    subject="Leo Arons",
    rephrase=("Leo Arons died in the city of",),
    locality=(Probe("The name of the father of Leo Arons is", ("Albert Arons",)),),
)
FILM = EditRequest(prompt="2021 in film follows", target_new="2020 in film", subject="2021 in film")


def _fake(text: str, words: list[tuple[int, int]], dim: int = 4, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    toks = rng.normal(size=(len(words), dim)).astype(np.float32)
    unit = toks / np.linalg.norm(toks, axis=1, keepdims=True)
    sent = toks.mean(axis=0)
    return Encoded(text, toks, unit, np.array(words), sent / np.linalg.norm(sent))


def _random_head(n_in: int, threshold: float = 0.5, hidden: int = 3) -> ScopeHead:
    rng = np.random.default_rng(0)
    return ScopeHead(
        mean=np.zeros(n_in, np.float32),
        std=np.ones(n_in, np.float32),
        w1=rng.normal(size=(n_in, hidden)).astype(np.float32) * 0.01,
        b1=np.zeros(hidden, np.float32),
        w2=rng.normal(size=hidden).astype(np.float32),
        b2=np.zeros(1, np.float32),
        threshold=threshold,
        meta={"base_encoder_sha256": "not-the-real-one"},
    )


# ---------------------------------------------------------------------- features
def test_subject_spans_exact_and_by_word() -> None:
    text = "Clarence Thomas' gender is"
    spans = subject_spans(text, "Clarence Thomas")
    assert (0, 15) in spans
    assert subject_spans("The progression of film in 2021", "2021 in film") == [(19, 23), (27, 31)]
    assert subject_spans("anything", "") == []
    assert "the" not in content_words("The Beatles of Liverpool")


def test_token_mask_drops_tokens_inside_spans() -> None:
    enc = _fake("Leo Arons died", [(0, 3), (4, 9), (10, 14)])
    assert token_mask(enc, [(0, 9)]).tolist() == [False, False, True]
    assert token_mask(enc, []).tolist() == [True, True, True]


def test_pair_features_shape_and_subject_flags() -> None:
    edit = edit_side(_fake("Leo Arons died", [(0, 3), (4, 9), (10, 14)]), "Leo Arons")
    same = pair_features(_fake("Leo Arons died", [(0, 3), (4, 9), (10, 14)]), edit)
    other = pair_features(_fake("Max Born died", [(0, 3), (4, 8), (9, 13)], seed=1), edit)
    assert same.shape == other.shape == (n_features(4),)
    i = SCALAR_FEATURES.index("subject_exact")
    assert same[i] == 1.0 and other[i] == 0.0
    assert same[SCALAR_FEATURES.index("cos_full")] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(same).all() and np.isfinite(other).all()


def test_pair_features_when_query_is_only_the_subject() -> None:
    edit = edit_side(_fake("Leo Arons died", [(0, 3), (4, 9), (10, 14)]), "Leo Arons")
    feats = pair_features(_fake("Leo Arons", [(0, 3), (4, 9)]), edit)
    assert np.isfinite(feats).all()


# ---------------------------------------------------------------------- training data
def test_views_paraphrase_known_templates_only() -> None:
    v = views("The place of death of Leo Arons is", "Leo Arons")
    assert v["cloze"] == "Leo Arons' place of death is"
    assert v["question"] == "What is the place of death of Leo Arons?"
    assert (
        views("The name of the award Ada won is", "Ada")["question"] == "Which award did Ada win?"
    )
    assert views("Toko Yasuda, the", "Toko Yasuda") == {}
    assert views("The gender of X is", "") == {}


def test_parse_record_formats() -> None:
    z = parse_record(
        "ZsRE",
        0,
        {
            "subject": "A",
            "src": "Who made A?",
            "rephrase": "A was made by whom?",
            "loc": "nq question: who is B",
        },
    )
    assert z is not None and z.rephrase == ("A was made by whom?",)
    assert z.locality == (("nq", "who is B"),)
    w = parse_record(
        "WikiData_recent",
        1,
        {
            "subject": "A",
            "prompt": "The gender of A is",
            "target_new": "x",
            "locality": {"Relation_Specificity": [{"prompt": "The occupation of A is"}]},
        },
    )
    assert w is not None and w.locality == (("Relation_Specificity", "The occupation of A is"),)
    assert parse_record("CounterFact", 2, {"prompt": ""}) is None


def test_build_pairs_labels(knowedit: Path) -> None:
    records = load_train_records(knowedit, limit=6)
    pairs = build_pairs(records, seed=0)
    assert {p.label for p in pairs} == {0, 1}
    for p in pairs:
        if p.kind == "locality":
            assert p.label == 0 and p.query != p.edit
        if p.kind == "self":
            assert p.label == 1
    assert any(p.kind == "rephrase" for p in pairs)


# ---------------------------------------------------------------------- head file
def test_head_roundtrip_and_validation(tmp_path: Path) -> None:
    head = _random_head(5, threshold=0.42)
    path = head.save(tmp_path / "h.json")
    back = ScopeHead.load(path)
    x = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    assert np.array_equal(head.predict(x), back.predict(x))
    assert back.threshold == pytest.approx(0.42)
    p = back.predict(x)
    assert ((p >= 0) & (p <= 1)).all()
    with pytest.raises(ScopeHeadError, match="shape"):
        back.predict(np.zeros((2, 4), np.float32))
    data = json.loads(path.read_text())
    data["threshold"] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ScopeHeadError, match="threshold"):
        ScopeHead.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ScopeHeadError, match="not a"):
        ScopeHead.load(tmp_path / "junk.json")


# ---------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def encoder() -> TokenEncoder:
    return TokenEncoder(cache_size=64)


@pytest.fixture(scope="module")
def scope() -> MiniLMScopeClassifier:
    return load_scope_classifier(progress=False)


def test_encoder_offsets_and_cache(encoder: TokenEncoder) -> None:
    a, b = encoder.encode(["Leo Arons died", "Leo Arons died"])
    assert a is b
    assert a.tokens.shape[1] == encoder.dim == 384
    assert a.offsets[0].tolist() == [0, 3]  # "leo"
    assert np.linalg.norm(a.sentence) == pytest.approx(1.0, abs=1e-5)
    assert encoder.encode(["Leo Arons died"])[0] is a


def test_default_classifier_api(scope: MiniLMScopeClassifier) -> None:
    assert isinstance(scope, ScopeClassifier)
    assert 0.0 < scope.threshold < 1.0
    scores = scope.score("Where did Leo Arons die?", [LEO, FILM])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert scope.score("Where did Leo Arons die?", []) == []
    pairs = [("Where did Leo Arons die?", LEO), ("2021 in film is followed by", FILM)]
    assert scope.score_batch(pairs)[0] == pytest.approx(scores[0], abs=1e-6)
    with pytest.raises(InvalidRequestError, match="query"):
        scope.score("  ", [LEO])
    with pytest.raises(InvalidRequestError, match="candidates"):
        scope.score("q", ["not a request"])  # type: ignore[list-item]


def test_default_classifier_separates_rephrase_from_locality(scope: MiniLMScopeClassifier) -> None:
    t = scope.threshold
    rephrase, same, loc, other = scope.score_batch(
        [
            ("Leo Arons' place of death is", LEO),
            (LEO.prompt, LEO),
            ("The name of the father of Leo Arons is", LEO),
            ("The place of death of Max Planck is", LEO),
        ]
    )
    assert same >= t and rephrase >= t
    assert loc < t and other < t


def test_edit_side_is_cached(scope: MiniLMScopeClassifier) -> None:
    scope.prepare([LEO, FILM])
    n = len(scope._edits)
    assert n >= 2
    scope.score("Who was the father of Leo Arons?", [LEO, FILM])
    assert len(scope._edits) == n


def test_head_for_another_encoder_is_refused(tmp_path: Path) -> None:
    head = _random_head(n_features(384))
    path = head.save(tmp_path / "other.json")
    with pytest.raises(ScopeHeadError, match="base encoder"):
        load_scope_classifier(path=path, progress=False)
    scope = load_scope_classifier(path=path, progress=False, verify_encoder=False, threshold=0.3)
    assert scope.threshold == 0.3


def test_head_with_wrong_width_is_refused(encoder: TokenEncoder) -> None:
    with pytest.raises(ScopeHeadError, match="features"):
        MiniLMScopeClassifier(encoder, _random_head(5))


def test_training_on_a_tiny_sample(knowedit: Path, encoder: TokenEncoder, tmp_path: Path) -> None:
    from memedit.scope.train import TrainConfig, train

    config = TrainConfig(epochs=2, hidden=4, counterfact_limit=5, folds=2)
    head, report = train(knowedit, config, encoder=encoder, record_limit=5)
    assert 0.0 <= head.threshold <= 1.0
    assert head.n_inputs == n_features(384)
    assert set(head.meta["training_files_sha256"]) == {
        "train/ZsRE/zsre_mend_eval_portability_gpt4.not_in_test.json",
        "train/WikiData_counterfact/train_cf.json",
        "train/WikiData_recent/recent_train.json",
        "train/CounterFact/counterfact-train.json",
    }
    assert "out_of_fold" in report
    back = ScopeHead.load(head.save(tmp_path / "tiny.json"))
    assert back.meta["base_encoder_sha256"] == head.meta["base_encoder_sha256"]


def test_calibration_keeps_target_recall() -> None:
    from memedit.scope.train import calibrate, calibration_positives

    pairs = [
        Pair("a?", "b?", "", 1, "rephrase", "g1"),
        Pair("b?", "b?", "", 1, "self", "g1"),
        Pair("c", "c", "", 1, "self", "g2"),  # no rephrasing in its record: not used
        Pair("d", "b?", "", 0, "locality", "g1"),
    ]
    mask = calibration_positives(pairs)
    assert mask.tolist() == [True, True, False, False]
    scores = np.array([0.3, 0.9, 0.01, 0.2])
    t = calibrate(scores, mask, 0.97)
    assert t == pytest.approx(0.3, abs=1e-5) and t <= 0.3


# ---------------------------------------------------------------------- question-form edits
ASKED = EditRequest(
    prompt="Who was the father of Leo Arons?",
    target_new="Max Planck",
    subject="Leo Arons",
    ground_truth=("Albert Arons",),
)


def test_question_threshold_roundtrip_and_validation(tmp_path: Path) -> None:
    head = _random_head(5, threshold=0.42)
    head.question_threshold = 0.71
    back = ScopeHead.load(head.save(tmp_path / "q.json"))
    assert back.question_threshold == pytest.approx(0.71)
    assert ScopeHead.load(_random_head(5).save(tmp_path / "none.json")).question_threshold is None
    data = json.loads((tmp_path / "q.json").read_text())
    for bad in (0.0, 1.0, "high"):
        data["question_threshold"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ScopeHeadError, match="question_threshold"):
            ScopeHead.load(tmp_path / "bad.json")


def test_question_threshold_moves_only_question_form_edits(encoder: TokenEncoder) -> None:
    rng = np.random.default_rng(3)
    plain = _random_head(n_features(384), threshold=0.4)
    plain.w2 = rng.normal(size=plain.w2.shape).astype(np.float32) * 40.0  # spread the scores
    plain.w1 = rng.normal(size=plain.w1.shape).astype(np.float32) * 0.05
    shifted = ScopeHead(**{**plain.__dict__, "question_threshold": 0.7})
    queries = [
        "Who was Leo Arons' father?",
        "The father of Leo Arons is",
        "Leo Arons died in",
        "Where did Leo Arons die?",
        "2021 in film is followed by",
        "Who is the mother of Leo Arons?",
    ]
    pairs = [(q, e) for q in queries for e in (ASKED, LEO, FILM)]
    raw = MiniLMScopeClassifier(encoder, plain).score_batch(pairs)
    moved = MiniLMScopeClassifier(encoder, shifted).score_batch(pairs)
    asked = [e.prompt.endswith("?") for _, e in pairs]
    assert any(asked) and not all(asked)
    for r, m, q in zip(raw, moved, asked, strict=True):
        if not q:
            assert m == r  # cloze edits keep the head's own probability
        else:
            assert (m >= 0.4) == (r >= 0.7)  # one threshold, the question form's calibration
            assert 0.0 <= m <= 1.0
    assert any(q and 0.4 <= r < 0.7 for r, q in zip(raw, asked, strict=True))


def test_asks_edited_fact_compares_old_answers_only() -> None:
    from memedit.scope.evaluate import asks_edited_fact

    same = Probe("The father of Leo Arons is", ("albert  ARONS",))
    other = Probe("The place of death of Leo Arons is", ("Berlin",))
    assert asks_edited_fact(ASKED, same)
    assert not asks_edited_fact(ASKED, other)
    assert not asks_edited_fact(LEO, same)  # no old answer known: never excluded


def test_zsre_dev_locality_prompts_that_ask_the_edited_fact(knowedit: Path) -> None:
    from memedit.datasets import load_requests
    from memedit.scope.evaluate import asks_edited_fact

    reqs = load_requests("ZsRE")
    hits = [(r.prompt, p.prompt) for r in reqs for p in r.locality if asks_edited_fact(r, p)]
    assert len(hits) == 220 and sum(len(r.locality) for r in reqs) == 1560
    assert (
        "What constellation is home to Butterfly Cluster?",
        "The constellation of Butterfly Cluster is",
    ) in hits
