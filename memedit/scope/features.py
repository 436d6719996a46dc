"""Pair features of (query, edit prompt) computed from frozen MiniLM token vectors.

The edit's subject is located in both texts (exact span, case-insensitive, plus any of the
subject's content words, so "Clarence Thomas' gender" and "The progression of film in 2021"
still lose their subject) and left out of the *relation* features:

* sentence cosines with and without the subject tokens;
* BERTScore-style alignment of the remaining tokens (precision, recall, F, and the worst
  aligned token on each side: an extra clause such as ", which is not X," shows up there);
* how much of the subject the query mentions (exact, content-word coverage, soft match);
* shape: question marks, token counts, shared content words;
* the element-wise product and absolute difference of the subject-free sentence vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from memedit.scope.encoder import Encoded

_STOPWORD_TEXT = (
    "a an the of in on at to for by with from and or is are was were be been being as that "
    "which who whom whose what where when how why this these those it its de la le du der "
    "von van s"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split(" "))

_WORD = re.compile(r"\w+", re.UNICODE)

#: Names of the scalar features, in order (the vector features follow them).
SCALAR_FEATURES = (
    "cos_full",
    "cos_masked",
    "align_p",
    "align_r",
    "align_f",
    "align_min_p",
    "align_min_r",
    "unaligned_q",
    "unaligned_e",
    "subject_exact",
    "subject_coverage",
    "subject_soft",
    "subject_soft_min",
    "has_subject",
    "query_subject_share",
    "log_len_ratio",
    "query_question",
    "edit_question",
    "word_jaccard",
    "query_extra_words",
)

UNALIGNED_SIM = 0.6


def content_words(text: str) -> set[str]:
    """Case-folded words of `text` that are not stop words (possessive 's dropped)."""
    return {w for w in (m.group().casefold() for m in _WORD.finditer(text)) if w not in STOPWORDS}


def subject_spans(text: str, subject: str) -> list[tuple[int, int]]:
    """Character spans of `text` that belong to `subject`: every case-insensitive occurrence
    of the whole subject, plus every word that is one of the subject's content words."""
    if not subject.strip():
        return []
    spans: list[tuple[int, int]] = []
    low, sub = text.casefold(), subject.casefold().strip()
    if len(low) == len(text):  # casefold kept offsets aligned (almost always)
        start = low.find(sub)
        while start >= 0:
            spans.append((start, start + len(sub)))
            start = low.find(sub, start + 1)
    words = content_words(subject)
    for m in _WORD.finditer(text):
        if m.group().casefold() in words:
            spans.append((m.start(), m.end()))
    return spans


def token_mask(enc: Encoded, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens outside every span (the relation part of the text)."""
    keep = np.ones(enc.offsets.shape[0], dtype=bool)
    for s, e in spans:
        keep &= ~((enc.offsets[:, 0] < e) & (enc.offsets[:, 1] > s))
    return keep


def _unit(x: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x / n if n > 1e-12 else x


@dataclass(frozen=True)
class EditSide:
    """Everything about the candidate edit the features need; computed once per edit."""

    enc: Encoded
    subject: str
    mask: np.ndarray  # tokens outside the subject
    masked_unit: np.ndarray  # (d,) L2-normalised mean of the relation tokens
    subject_unit: np.ndarray  # (S, d) unit vectors of the subject tokens (may be empty)
    words: frozenset[str]  # content words outside the subject
    subject_words: frozenset[str]


def edit_side(enc: Encoded, subject: str) -> EditSide:
    spans = subject_spans(enc.text, subject)
    mask = token_mask(enc, spans)
    rel = mask if mask.any() else np.ones_like(mask)
    subj_words = frozenset(content_words(subject))
    return EditSide(
        enc=enc,
        subject=subject,
        mask=mask,
        masked_unit=_unit(enc.tokens[rel].mean(axis=0)).astype(np.float32),
        subject_unit=enc.unit[~mask],
        words=frozenset(content_words(enc.text) - subj_words),
        subject_words=subj_words,
    )


def n_features(dim: int) -> int:
    return len(SCALAR_FEATURES) + 2 * dim


def pair_features(query: Encoded, edit: EditSide) -> np.ndarray:
    """The feature vector of one (query, edit) pair: scalars, then u*v and |u-v|."""
    spans = subject_spans(query.text, edit.subject)
    qmask = token_mask(query, spans)
    qrel = qmask if qmask.any() else np.ones_like(qmask)
    erel = edit.mask if edit.mask.any() else np.ones_like(edit.mask)
    u = _unit(query.tokens[qrel].mean(axis=0))
    v = edit.masked_unit
    sim = query.unit[qrel] @ edit.enc.unit[erel].T  # (Tq, Te)
    best_q = sim.max(axis=1)
    best_e = sim.max(axis=0)
    p, r = float(best_q.mean()), float(best_e.mean())
    if edit.subject_unit.shape[0]:
        soft = (edit.subject_unit @ query.unit.T).max(axis=1)
        soft_mean, soft_min = float(soft.mean()), float(soft.min())
    else:
        soft_mean = soft_min = 0.0
    qwords = content_words(query.text)
    q_rel_words = qwords - edit.subject_words
    union = q_rel_words | edit.words
    subject_words = edit.subject_words
    coverage = len(subject_words & qwords) / len(subject_words) if subject_words else 0.0
    exact = bool(edit.subject.strip()) and edit.subject.casefold() in query.text.casefold()
    scalars = np.array(
        [
            float(query.sentence @ edit.enc.sentence),
            float(u @ v),
            p,
            r,
            2 * p * r / (p + r) if p + r > 1e-9 else 0.0,
            float(best_q.min()),
            float(best_e.min()),
            float((best_q < UNALIGNED_SIM).sum()) / 4.0,
            float((best_e < UNALIGNED_SIM).sum()) / 4.0,
            float(exact),
            coverage,
            soft_mean,
            soft_min,
            float(bool(edit.subject.strip())),
            1.0 - float(qmask.mean()),
            float(np.log((qrel.sum() + 1) / (erel.sum() + 1))),
            float(query.text.rstrip().endswith("?")),
            float(edit.enc.text.rstrip().endswith("?")),
            len(q_rel_words & edit.words) / len(union) if union else 1.0,
            len(q_rel_words - edit.words) / 4.0,
        ],
        dtype=np.float32,
    )
    return np.concatenate([scalars, (u * v).astype(np.float32), np.abs(u - v).astype(np.float32)])
