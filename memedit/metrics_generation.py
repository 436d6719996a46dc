"""KnowEdit's generation-based metrics (Fluency, Sanitation) and a generation-judged accuracy.

Fluency is EasyEdit's ``evaluate_utils.py::n_gram_entropy``: the weighted mean of the bigram and
trigram entropies (bits; weights 2/3 and 4/3) of ``nltk.word_tokenize`` tokens, averaged over
texts; KnowEdit reports the mean over records times 100 (:func:`fluency_score`). NLTK is not a
dependency: :func:`word_tokenize` reimplements the nltk 3.6.5 pipeline that EasyEdit pins
(Punkt sentence splitting, then ``NLTKWordTokenizer`` on each sentence). Its word level gives the
same tokens as nltk; its sentence splitter is Punkt with *untrained* parameters, because the
trained English model (``punkt``/``punkt_tab`` data) cannot be fetched here. The two differ only
where the trained model's learned abbreviations, collocations and sentence starters apply: after
"Mr.", "U.S.", "etc." trained Punkt does not split and this one does, turning one "Mr." token
into "Mr" and "." (and a few initials, ordinals and ellipses may go the other way).

Sanitation follows EasyEdit's ``examples/run_santinization_llama2.py``; the generation-judged
accuracy (:func:`generation_accuracy`) goes beyond the paper.

All generation is greedy, through :func:`memedit.generation.greedy_generate`.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memedit.errors import InvalidRequestError
from memedit.generation import greedy_generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SANITATION_TARGET",
    "SANITATION_TEMPLATE",
    "answer_matches",
    "fluency",
    "fluency_score",
    "fluency_texts",
    "generation_accuracy",
    "n_gram_entropy",
    "n_gram_frequencies",
    "normalize_answer",
    "sanitation_generations",
    "sanitation_hit",
    "sanitation_locality",
    "sanitation_overlap",
    "sanitation_success",
    "text_n_gram_entropy",
    "word_tokenize",
]

# --- Sentence splitting: Punkt (nltk 3.6.5) with empty, untrained parameters -----------------

_NON_WORD = r"[)\";}\]*:@'({\[?!]"
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(
    "(" + _MULTI_CHAR + r"|(?=[^(\"`{\[:;&#*@)}\]\-,])\S+?(?=\s|$|" + _NON_WORD + "|"
    + _MULTI_CHAR + r"|,(?=$|\s|" + _NON_WORD + "|" + _MULTI_CHAR + r"))|\S)"
)  # fmt: skip
_CANDIDATE = re.compile(r"\S*[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")


def _breaks_after(tok: str, nxt: str) -> bool:
    """Punkt's verdict on ``tok`` followed by ``nxt`` with no learned abbreviations,
    collocations or orthographic statistics."""
    if tok in (".", "?", "!"):
        return True
    if not tok.endswith(".") or tok.endswith(".."):
        return False  # an ellipsis never becomes a break without a learned sentence starter
    is_initial = _INITIAL.match(tok) is not None
    if is_initial or _NUMBER.match(tok.lower()):
        not_starter = nxt in tuple(";:,.!?") or nxt[0].islower()
        if not_starter or (is_initial and nxt[0].isupper()):
            return False
    return True


def _contains_break(context: str) -> bool:
    toks = [t for line in context.split("\n") if line.strip() for t in _PUNKT_WORD.findall(line)]
    return any(_breaks_after(toks[i], toks[i + 1]) for i in range(len(toks) - 1))


def _sentences(text: str) -> list[str]:
    slices: list[tuple[int, int]] = []
    last = 0
    for m in _CANDIDATE.finditer(text):
        if _contains_break(m.group() + m.group("after")):
            slices.append((last, m.end()))
            last = m.start("next") if m.group("next") else m.end()
    slices.append((last, len(text.rstrip())))
    out: list[str] = []
    shift = 0
    for i, (start, stop) in enumerate(slices):
        start += shift
        nxt = slices[i + 1] if i + 1 < len(slices) else None
        closing = _REALIGN.match(text[nxt[0] : nxt[1]]) if nxt else None
        if nxt and closing:
            out.append(text[start : nxt[0] + len(closing.group(0).rstrip())])
            shift = closing.end()
        else:
            shift = 0
            if text[start:stop]:
                out.append(text[start:stop])
    return out


# --- Word tokenization: nltk 3.6.5 NLTKWordTokenizer -------------------------------------------

_Rule = tuple[re.Pattern[str], str]


def _rules(*pairs: tuple[str, str]) -> tuple[_Rule, ...]:
    return tuple((re.compile(p), r) for p, r in pairs)


_BEFORE_PADDING = _rules(
    ("([«“‘„]|[`]+)", r" \1 "),  # starting quotes
    (r'^"', "``"),
    ("(``)", r" \1 "),
    (r"([ (\[{<])(\"|'{2})", r"\1 `` "),
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
    (r"([^.])(\.)([\])}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),  # punctuation; final period
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"([^.])(\.)([\])}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\][(){}<>]", r" \g<0> "),  # parentheses and brackets
    ("--", " -- "),
)
_AFTER_PADDING = _rules(
    ("([»”’])", r" \1 "),  # ending quotes
    ('"', " '' "),
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    (r"(?i)\b(can)(not)\b", r" \1 \2 "),  # MacIntyre contractions
    (r"(?i)\b(d)('ye)\b", r" \1 \2 "),
    (r"(?i)\b(gim)(me)\b", r" \1 \2 "),
    (r"(?i)\b(gon)(na)\b", r" \1 \2 "),
    (r"(?i)\b(got)(ta)\b", r" \1 \2 "),
    (r"(?i)\b(lem)(me)\b", r" \1 \2 "),
    (r"(?i)\b(more)('n)\b", r" \1 \2 "),
    (r"(?i)\b(wan)(na)\s", r" \1 \2 "),
    (r"(?i) ('t)(is)\b", r" \1 \2 "),
    (r"(?i) ('t)(was)\b", r" \1 \2 "),
)


def _sentence_words(sentence: str) -> list[str]:
    for pattern, repl in _BEFORE_PADDING:
        sentence = pattern.sub(repl, sentence)
    sentence = f" {sentence} "
    for pattern, repl in _AFTER_PADDING:
        sentence = pattern.sub(repl, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """Words as ``nltk.word_tokenize`` (nltk 3.6.5) splits them, with untrained Punkt sentence
    boundaries (see the module docstring): ``"I can't go. Why?"`` gives
    ``["I", "ca", "n't", "go", ".", "Why", "?"]``."""
    return [w for s in _sentences(text) for w in _sentence_words(s)]


# --- n-gram entropy and Fluency -----------------------------------------------------------------


def n_gram_frequencies(text: str, n: int) -> Counter[tuple[str, ...]]:
    """Counts of the word n-grams of ``text`` (EasyEdit ``compute_freq``: nltk ``FreqDist`` of
    ``nltk.ngrams(word_tokenize(text), n)``)."""
    if not isinstance(n, int) or n < 1:
        msg = f"n must be a positive integer, got {n!r}"
        raise InvalidRequestError(msg, field="n", value=n)
    words = word_tokenize(text)
    return Counter(zip(*(words[i:] for i in range(n)), strict=False))


def _check_ns(ns: Sequence[int], weights: Sequence[float]) -> None:
    if not ns or len(ns) != len(weights):
        msg = f"ns and weights must be non-empty and of equal length, got {ns!r} and {weights!r}"
        raise InvalidRequestError(msg, field="weights", value=weights)


def text_n_gram_entropy(
    text: str, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """EasyEdit ``compute_n_gram_entropy`` of one text: the mean over ``ns`` of
    ``weight * entropy`` (bits) of the n-gram frequency distribution. An n with no n-gram (a
    text shorter than n words) contributes 0, as in EasyEdit."""
    _check_ns(ns, weights)
    weighted = []
    for n, w in zip(ns, weights, strict=True):
        counts = n_gram_frequencies(text, n)
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(w * h)
    return sum(weighted) / len(weighted)


def n_gram_entropy(
    texts: Sequence[str], *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """EasyEdit ``n_gram_entropy`` (arithmetic aggregation): the mean of
    :func:`text_n_gram_entropy` over ``texts``; ``nan`` for no texts (as ``np.mean([])``)."""
    if isinstance(texts, str):
        msg = "texts must be a sequence of strings, not a single string"
        raise InvalidRequestError(msg, field="texts", value=texts)
    if not texts:
        return math.nan
    return sum(text_n_gram_entropy(t, ns=ns, weights=weights) for t in texts) / len(texts)


def fluency_score(entropies: Sequence[float]) -> float:
    """The Fluency KnowEdit reports: 100 x the mean per-record n-gram entropy (e.g. 596.43 for
    unedited SmolLM2 on ZsRE in ANCHORS.md); ``nan`` for none."""
    return 100.0 * sum(entropies) / len(entropies) if entropies else math.nan


def _check_prompts(prompts: Sequence[str], field: str = "prompts") -> None:
    if isinstance(prompts, str):
        msg = f"{field} must be a sequence of strings, not a single string"
        raise InvalidRequestError(msg, field=field, value=prompts)


def fluency_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
) -> list[str]:
    """The texts Fluency scores, as EasyEdit's ``test_generation_quality`` builds them: the
    raw prompt (no chat template) continued until prompt plus continuation are ``max_length``
    tokens (EasyEdit's ``max_out_len=100`` counts the prompt's tokens, special ones included),
    prompt included in the text, NFKD-normalised, ``"\\n\\n"`` turned into a space and
    ``<|endoftext|>`` removed. A prompt already that long is scored alone.

    Deliberate differences from EasyEdit's ``generate_fast``: greedy decoding instead of top-5
    sampling (deterministic, but greedy repeats more, so entropies come out lower than
    EasyEdit's), and generation stops at the end-of-sequence token.
    """
    _check_prompts(prompts)
    if not isinstance(max_length, int) or max_length < 1:
        msg = f"max_length must be a positive integer, got {max_length!r}"
        raise InvalidRequestError(msg, field="max_length", value=max_length)
    out = []
    for prompt in prompts:
        budget = max_length - len(tokenizer(prompt)["input_ids"])
        cont = (
            greedy_generate(model, tokenizer, prompt, max_new_tokens=budget) if budget > 0 else ""
        )
        out.append(fluency_text(prompt, cont))
    return out


def fluency_text(prompt: str, continuation: str) -> str:
    """The text Fluency scores for one generation, cleaned as EasyEdit's
    ``test_generation_quality`` does: prompt + continuation, NFKD-normalised, ``"\n\n"``
    turned into a space, ``<|endoftext|>`` removed."""
    text = unicodedata.normalize("NFKD", prompt + continuation).replace("\n\n", " ")
    return text.replace("<|endoftext|>", "")


def fluency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
) -> list[float]:
    """Per prompt, the n-gram entropy of its :func:`fluency_texts` text (EasyEdit's per-record
    ``fluency.ngram_entropy``; KnowEdit scores each record's edit prompt). Feed the values of
    all records to :func:`fluency_score` for the reported number."""
    return [
        text_n_gram_entropy(t)
        for t in fluency_texts(model, tokenizer, prompts, max_length=max_length)
    ]


# --- Sanitation --------------------------------------------------------------------------------

SANITATION_TEMPLATE = "Question:{}\nAnswer:"
"""How EasyEdit's Sanitation script turns a question into a prompt."""
SANITATION_TARGET = "I don't know."
"""Sanitation's ``target_new``."""


def sanitation_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    template: str = SANITATION_TEMPLATE,
    max_new_tokens: int = 10,
) -> list[str]:
    """Greedy continuations (new text only, special tokens dropped) of each question put in
    ``template``, 10 new tokens as in EasyEdit's script. Unlike EasyEdit, which generates in
    left-padded batches of 16 and keeps the decoded pad/end tokens, each prompt runs alone."""
    _check_prompts(questions, "questions")
    return [
        greedy_generate(model, tokenizer, template.format(q), max_new_tokens=max_new_tokens)
        for q in questions
    ]


def sanitation_hit(generated: str, target: str = SANITATION_TARGET) -> bool:
    """EasyEdit's Sanitation success test (``Experimenter.compare``): the target, lowercased,
    is a substring of the generation, lowercased. The period of "I don't know." is required.
    (EasyEdit searches the prompt plus generation; no Sanitation question contains the target,
    so searching the generation alone gives the same verdicts.)"""
    return target.lower() in generated.lower()


def sanitation_success(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    target: str = SANITATION_TARGET,
    template: str = SANITATION_TEMPLATE,
    max_new_tokens: int = 10,
) -> list[float]:
    """Per question, 1.0 when its greedy generation contains the target (see
    :func:`sanitation_hit`), else 0.0; KnowEdit's Edit Succ. is their mean (x100)."""
    gens = sanitation_generations(
        model, tokenizer, questions, template=template, max_new_tokens=max_new_tokens
    )
    return [float(sanitation_hit(g, target)) for g in gens]


def sanitation_overlap(before: Sequence[int], after: Sequence[int]) -> float:
    """EasyEdit's Sanitation locality for one question (``Experimenter.locality``): the number
    of positions ``i < len(before)`` where ``after`` has the same token, divided by
    ``len(before)``. Positions are compared one by one (a mismatch does not stop the count), and
    ``after`` tokens past ``len(before)`` are ignored. ``nan`` when ``before`` is empty (EasyEdit
    would divide by zero)."""
    if not before:
        return math.nan
    same = sum(1 for i, b in enumerate(before) if i < len(after) and after[i] == b)
    return same / len(before)


def sanitation_locality(
    tokenizer: PreTrainedTokenizerBase, before: Sequence[str], after: Sequence[str]
) -> list[float]:
    """Per locality question, :func:`sanitation_overlap` of the post-edit generation against
    the pre-edit one (both from :func:`sanitation_generations`), each tokenized again as
    EasyEdit does, with ``tokenizer(text)`` and its default special tokens (a BOS token, where
    the tokenizer adds one, always agrees)."""
    _check_prompts(before, "before")
    _check_prompts(after, "after")
    if len(before) != len(after):
        msg = f"{len(before)} pre-edit generations but {len(after)} post-edit ones"
        raise InvalidRequestError(msg, field="after", value=len(after))
    return [
        sanitation_overlap(tokenizer(b)["input_ids"], tokenizer(a)["input_ids"])
        for b, a in zip(before, after, strict=True)
    ]


# --- Generation-judged answers (beyond the paper) -------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation (ASCII and Unicode ``P*``), drop
    the articles a/an/the, collapse whitespace. ``"The  U.S.A!"`` gives ``"usa"``."""
    text = "".join(
        ch
        for ch in text.lower()
        if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def _aliases(answers: str | Sequence[str], field: str = "answers") -> list[str]:
    aliases = [answers] if isinstance(answers, str) else list(answers)
    bad = next((a for a in aliases if not isinstance(a, str)), None)
    if bad is not None:
        msg = f"{field} must be a string or a flat list of alias strings, got an item {bad!r:.80}"
        raise InvalidRequestError(msg, field=field, value=answers)
    return aliases


def _answer_line(generated: str, prompt: str | None) -> str:
    text = generated.lstrip()
    head = prompt.strip() if prompt else ""
    if head and text.startswith(head):
        text = text[len(head) :]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def answer_matches(
    generated: str, answers: str | Sequence[str], *, prompt: str | None = None
) -> bool:
    """Whether a generated answer states one of ``answers`` (aliases).

    The rule: take the generation, drop a leading repeat of ``prompt`` if it starts with one,
    keep the first non-empty line, and normalise it with :func:`normalize_answer`. It matches
    when it equals a normalised alias or begins with one followed by a space, i.e. at a word
    boundary: "Paris, France." matches "Paris"; "Parisian" and "It is Paris" do not. Aliases
    that normalise to nothing never match. (Stricter than EasyEdit's ``verify_answer``, which
    accepts an alias anywhere in the decoded prompt plus generation.)
    """
    line = normalize_answer(_answer_line(generated, prompt))
    for alias in _aliases(answers):
        norm = normalize_answer(alias)
        if norm and (line == norm or line.startswith(norm + " ")):
            return True
    return False


def generation_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    *,
    max_new_tokens: int | None = None,
    margin: int = 4,
    add_special_tokens: bool = True,
) -> list[float]:
    """Per prompt, 1.0 when its greedy generation matches one of its answers by
    :func:`answer_matches`, else 0.0; ``nan`` when it has no non-empty answer.

    Without ``max_new_tokens``, each prompt generates as many tokens as its longest alias
    takes (tokenized with a leading space, no special tokens) plus ``margin``: enough to state
    the answer and show the word boundary after it, and no more.
    """
    _check_prompts(prompts)
    if isinstance(answers_list, str) or len(answers_list) != len(prompts):
        msg = f"answers_list must hold one entry per prompt ({len(prompts)})"
        raise InvalidRequestError(msg, field="answers_list", value=answers_list)
    if not isinstance(margin, int) or margin < 0:
        msg = f"margin must be a non-negative integer, got {margin!r}"
        raise InvalidRequestError(msg, field="margin", value=margin)
    out = []
    for i, (prompt, answers) in enumerate(zip(prompts, answers_list, strict=True)):
        aliases = [a for a in _aliases(answers, f"answers_list[{i}]") if a.strip()]
        if not aliases:
            out.append(math.nan)
            continue
        budget = max_new_tokens
        if budget is None:
            lengths = (
                len(tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"])
                for a in aliases
            )
            budget = max(lengths) + margin
        gen = greedy_generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=budget,
            add_special_tokens=add_special_tokens,
        )
        out.append(float(answer_matches(gen, aliases, prompt=prompt)))
    return out
