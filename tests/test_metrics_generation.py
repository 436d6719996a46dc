"""Generation-based metrics (Fluency, Sanitation, generation-judged answers), pinned on
hand-computed cases and run on tiny random models."""

from __future__ import annotations

import math
from typing import Any

import pytest

import memedit.metrics_generation as mg
from memedit.errors import InvalidRequestError
from memedit.generation import greedy_generate
from memedit.metrics_generation import (
    answer_matches,
    fluency,
    fluency_score,
    fluency_texts,
    generation_accuracy,
    n_gram_entropy,
    n_gram_frequencies,
    normalize_answer,
    sanitation_generations,
    sanitation_hit,
    sanitation_locality,
    sanitation_overlap,
    sanitation_success,
    text_n_gram_entropy,
    word_tokenize,
)
from tests.tiny import tiny_llama, tiny_tokenizer


class FakeGenerate:
    """Stands in for greedy_generate: records each call and returns canned continuations."""

    def __init__(self, replies: dict[str, str] | None = None, default: str = "") -> None:
        self.replies = replies or {}
        self.default = default
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model: Any, tokenizer: Any, text: str, **kwargs: Any) -> str:
        self.calls.append((text, kwargs["max_new_tokens"]))
        return self.replies.get(text, self.default)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeGenerate:
    gen = FakeGenerate()
    monkeypatch.setattr(mg, "greedy_generate", gen)
    return gen


# --- word tokenization: expected tokens produced by nltk 3.6.5 (EasyEdit's pin) ----------------
# nltk.tokenize.punkt.PunktSentenceTokenizer() then NLTKWordTokenizer().tokenize per sentence.

NLTK_CASES = [
    (
        "I can't go. Why? Because \"it's\" late!",
        ["I", "ca", "n't", "go", ".", "Why", "?", "Because", "``", "it", "'s", "''", "late", "!"],
    ),
    (
        "It costs $3.50 (roughly), and J. K. Rowling paid... twice.",
        ["It", "costs", "$", "3.50", "(", "roughly", ")", ",", "and", "J.", "K.", "Rowling",
         "paid", "...", "twice", "."],
    ),
    (
        "He said: \u201cgonna\u201d -- and left. 3. items cannot wait.",
        ["He", "said", ":", "\u201c", "gon", "na", "\u201d", "--", "and", "left", ".", "3.",
         "items", "can", "not", "wait", "."],
    ),
    ("Paris. Paris.", ["Paris", ".", "Paris", "."]),
    (
        "The capital of France is Paris.The next",
        ["The", "capital", "of", "France", "is", "Paris.The", "next"],
    ),
    ("", []),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), NLTK_CASES)
def test_word_tokenize_gives_nltk_tokens(text: str, expected: list[str]) -> None:
    assert word_tokenize(text) == expected


def test_n_gram_frequencies() -> None:
    counts = n_gram_frequencies("the cat sat on the cat", 2)
    assert counts == {
        ("the", "cat"): 2,
        ("cat", "sat"): 1,
        ("sat", "on"): 1,
        ("on", "the"): 1,
    }
    assert n_gram_frequencies("one two", 3) == {}
    with pytest.raises(InvalidRequestError, match="positive integer"):
        n_gram_frequencies("a b", 0)


def test_n_gram_entropy_on_hand_computed_counts() -> None:
    # "to be to be": bigrams (to,be) x2, (be,to) x1 -> H2 = log2(3) - 2/3 = 0.918296 bits;
    # trigrams (to,be,to), (be,to,be) -> H3 = 1; (2/3 * H2 + 4/3 * H3) / 2 = 0.972765.
    assert text_n_gram_entropy("to be to be") == pytest.approx(0.972765278018163, rel=1e-12)
    # Sentence splitting matters: "Paris. Paris." is Paris . Paris . -> the same counts.
    assert text_n_gram_entropy("Paris. Paris.") == pytest.approx(0.972765278018163, rel=1e-12)
    # Five distinct words: H2 = log2(4) = 2, H3 = log2(3) -> 2/3 + 2/3 * log2(3).
    distinct = "one two three four five"
    assert text_n_gram_entropy(distinct) == pytest.approx(1.7233083338141038, rel=1e-12)
    assert text_n_gram_entropy(distinct, ns=(2,), weights=(1.0,)) == pytest.approx(2.0)
    assert text_n_gram_entropy("word") == 0.0  # no bigram nor trigram contributes 0
    assert text_n_gram_entropy("") == 0.0
    assert n_gram_entropy(["to be to be", "word"]) == pytest.approx(0.972765278018163 / 2)
    assert math.isnan(n_gram_entropy([]))
    with pytest.raises(InvalidRequestError, match="single string"):
        n_gram_entropy("to be to be")
    with pytest.raises(InvalidRequestError, match="equal length"):
        text_n_gram_entropy("a b c", ns=(2, 3), weights=(1.0,))


def test_fluency_score_is_the_reported_scale() -> None:
    assert fluency_score([5.0, 6.0]) == 550.0
    assert fluency_score([5.9643]) == pytest.approx(596.43)
    assert math.isnan(fluency_score([]))


def test_fluency_texts_budget_prompt_and_cleanup(fake: FakeGenerate) -> None:
    tok = tiny_tokenizer()
    prompt = "Where did Leo Arons die?"
    n_prompt = len(tok(prompt)["input_ids"])
    fake.default = " He died\n\nin Berlin<|endoftext|> caf\u00e9"
    got = fluency_texts(None, tok, [prompt], max_length=n_prompt + 7)  # type: ignore[arg-type]
    assert fake.calls == [(prompt, 7)]  # the budget counts the prompt's tokens
    assert got == [prompt + " He died in Berlin cafe\u0301"]  # NFKD, blank line, end marker
    fake.calls.clear()
    assert fluency_texts(None, tok, [prompt], max_length=n_prompt) == [prompt]  # type: ignore[arg-type]
    assert fake.calls == []  # a prompt already max_length long is scored alone
    with pytest.raises(InvalidRequestError, match="max_length"):
        fluency_texts(None, tok, [prompt], max_length=0)  # type: ignore[arg-type]


def test_fluency_on_a_tiny_model_is_deterministic() -> None:
    model, tok = tiny_llama()
    prompts = ["The place of death of Leo Arons is", "The sky is"]
    texts = fluency_texts(model, tok, prompts, max_length=30)
    assert [t.startswith(p) for t, p in zip(texts, prompts, strict=True)] == [True, True]
    assert len(tok(texts[1])["input_ids"]) > len(tok(prompts[1])["input_ids"])
    scores = fluency(model, tok, prompts, max_length=30)
    assert scores == [text_n_gram_entropy(t) for t in texts]
    assert fluency(model, tok, prompts, max_length=30) == scores
    assert all(s >= 0.0 for s in scores)


# --- Sanitation ----------------------------------------------------------------------------------


def test_sanitation_hit_is_case_insensitive_substring_with_the_period() -> None:
    assert sanitation_hit(" I don't know. Sorry")
    assert sanitation_hit("i DON'T KNOW.")
    assert not sanitation_hit(" I don't know")  # the target's period is part of it
    assert not sanitation_hit(" Birds")
    assert sanitation_hit("Birds", target="birds")


def test_sanitation_overlap_counts_agreeing_positions() -> None:
    assert sanitation_overlap([1, 2, 3, 4], [1, 9, 3]) == 0.5  # not a prefix: pos 2 counts
    assert sanitation_overlap([1, 2], [1, 2, 7, 8]) == 1.0  # extra post-edit tokens ignored
    assert sanitation_overlap([1, 2], []) == 0.0
    assert math.isnan(sanitation_overlap([], [1]))


def test_sanitation_success_and_generations(fake: FakeGenerate) -> None:
    fake.replies = {
        "Question:What is a killdeer?\nAnswer:": " I don't know. It",
        "Question:Who won?\nAnswer:": " i DON'T KNOW.",
        "Question:Where?\nAnswer:": " I don't know",
    }
    questions = ["What is a killdeer?", "Who won?", "Where?"]
    got = sanitation_success(None, None, questions)  # type: ignore[arg-type]
    assert got == [1.0, 1.0, 0.0]
    assert [n for _, n in fake.calls] == [10, 10, 10]
    with pytest.raises(InvalidRequestError, match="single string"):
        sanitation_generations(None, None, "Who won?")  # type: ignore[arg-type]


def test_sanitation_locality_retokenizes_generations() -> None:
    tok = tiny_tokenizer()
    before = ["The sky is blue.", "Leo Arons died in Berlin"]
    after = ["The sky is blue. The capital", "Leo Arons is Paris"]
    ids_before = tok(before[1])["input_ids"]
    ids_after = tok(after[1])["input_ids"]
    same = sum(1 for i, b in enumerate(ids_before) if i < len(ids_after) and ids_after[i] == b)
    assert 0 < same < len(ids_before)
    got = sanitation_locality(tok, before, after)
    assert got == [1.0, same / len(ids_before)]
    with pytest.raises(InvalidRequestError, match="2 pre-edit generations but 1"):
        sanitation_locality(tok, before, after[:1])


def test_sanitation_generations_on_a_tiny_model() -> None:
    model, tok = tiny_llama()
    questions = ["What type of creature is the Australian currawong?", "Who won?"]
    gens = sanitation_generations(model, tok, questions)
    assert len(gens) == 2 and gens == sanitation_generations(model, tok, questions)
    prompt = "Question:What type of creature is the Australian currawong?\nAnswer:"
    assert gens[0] == greedy_generate(model, tok, prompt, max_new_tokens=10)
    assert sanitation_locality(tok, gens, gens) == [1.0, 1.0]


# --- generation-judged answers --------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert normalize_answer("The  U.S.A!") == "usa"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("\u201cParis\u201d \u2014 France") == "paris france"
    assert normalize_answer("Th\u00e9\u00e2tre") == "th\u00e9\u00e2tre"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize(
    ("generated", "answers", "prompt", "expected"),
    [
        ("Paris", ["Paris"], None, True),
        (" paris.", "Paris", None, True),  # a single alias may be a plain string
        ("The Paris, France.", ["Paris"], None, True),  # article and punctuation dropped
        ("Big Apple is its name", ["New York City", "Big Apple"], None, True),  # any alias
        ("Beatles", ["The Beatles"], None, True),
        ("\n  Paris\nmore", ["Paris"], None, True),  # first non-empty line
        ("Q: capital? A: Paris", ["Paris"], "Q: capital? A:", True),  # prompt repeat dropped
        ("Parisian", ["Paris"], None, False),  # word boundary
        ("Par", ["Paris"], None, False),
        ("It is Paris", ["Paris"], None, False),  # must begin with the answer
        ("Paris\nLondon", ["London"], None, False),  # only the first line counts
        ("Q: capital? A: Paris", ["Paris"], None, False),
        ("Paris", ["", "  ", "the"], None, False),  # aliases that normalise to nothing
        ("", ["Paris"], None, False),
    ],
)
def test_answer_matches(
    generated: str, answers: list[str] | str, prompt: str | None, expected: bool
) -> None:
    assert answer_matches(generated, answers, prompt=prompt) is expected


def test_generation_accuracy_budget_and_judging(fake: FakeGenerate) -> None:
    tok = tiny_tokenizer()
    fake.replies = {"Capital of France?": " Paris, of course", "Leo Arons died in": " Parisian"}
    prompts = ["Capital of France?", "Leo Arons died in", "Empty"]
    answers: list[str | list[str]] = [["Paris", "The capital of France"], "Paris", []]
    got = generation_accuracy(None, tok, prompts, answers)  # type: ignore[arg-type]
    assert got[:2] == [1.0, 0.0] and math.isnan(got[2])
    longest = len(tok(" The capital of France", add_special_tokens=False)["input_ids"])
    assert fake.calls == [
        ("Capital of France?", longest + 4),
        ("Leo Arons died in", len(tok(" Paris", add_special_tokens=False)["input_ids"]) + 4),
    ]
    fake.calls.clear()
    generation_accuracy(None, tok, prompts[:1], answers[:1], max_new_tokens=3)  # type: ignore[arg-type]
    assert fake.calls == [("Capital of France?", 3)]
    with pytest.raises(InvalidRequestError, match="one entry per prompt"):
        generation_accuracy(None, tok, prompts, answers[:2])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"answers_list\[0\] must be .* flat list"):
        generation_accuracy(None, tok, ["q"], [[["Paris"]]])  # type: ignore[arg-type, list-item]
    with pytest.raises(InvalidRequestError, match="margin"):
        generation_accuracy(None, tok, prompts, answers, margin=-1)  # type: ignore[arg-type]


def test_generation_accuracy_on_a_tiny_model() -> None:
    model, tok = tiny_llama()
    prompt = "The capital of France is"
    generated = greedy_generate(model, tok, prompt, max_new_tokens=8)
    line = next(x.strip() for x in generated.splitlines() if x.strip())
    assert normalize_answer(line)  # a judgeable answer (the model is fixed by its seed)
    got = generation_accuracy(model, tok, [prompt] * 2, [[line], [line + "x"]], max_new_tokens=8)
    assert got == [1.0, 0.0]
