"""Training pairs for the scope classifier, built from the KnowEdit *train* files only.

Positives: an edit prompt with itself, with its rephrasings (ZsRE) and with template
paraphrases of WikiData-style prompts ("The place of death of X is" → "X's place of death
is", "What is the place of death of X?", "X place of death" …). Negatives: the record's own
locality prompts (same subject, another relation — and "Forgetfulness" prompts, the same
relation with an extra "which is not …" clause), prompts of the same relation about another
subject, random other prompts, and — for ZsRE's question-form edits, whose train file has no
same-subject locality prompts — WikiData relation clozes filled with the ZsRE subject that share
no content word with the question. Each pair carries its record as ``group`` so held-out
calibration splits by record, never by pair.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memedit.scope.features import content_words

#: Train file of each fact dataset, relative to ``<knowedit>/train/``.
TRAIN_FILES = {
    "ZsRE": "ZsRE/zsre_mend_eval_portability_gpt4.not_in_test.json",
    "WikiData_counterfact": "WikiData_counterfact/train_cf.json",
    "WikiData_recent": "WikiData_recent/recent_train.json",
    "CounterFact": "CounterFact/counterfact-train.json",
}


@dataclass(frozen=True)
class TrainRecord:
    dataset: str
    index: int
    subject: str
    prompt: str
    rephrase: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()  # (kind, prompt)

    @property
    def group(self) -> str:
        return f"{self.dataset}:{self.index}"


@dataclass(frozen=True)
class Pair:
    query: str
    edit: str
    subject: str
    label: int
    kind: str
    group: str


def _loc_prompts(block: object) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(block, Mapping):
        for kind, items in block.items():
            for item in items if isinstance(items, list) else [items]:
                prompt = item.get("prompt") if isinstance(item, Mapping) else None
                if isinstance(prompt, str) and prompt.strip():
                    out.append((str(kind), prompt))
    return out


def parse_record(dataset: str, index: int, raw: Mapping[str, Any]) -> TrainRecord | None:
    """One upstream train record as a `TrainRecord` (None if it has no usable prompt)."""
    subject = str(raw.get("subject") or "")
    rephrase: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]
    if dataset == "ZsRE":
        prompt = raw.get("src")
        reph = raw.get("rephrase")
        rephrase = (reph,) if isinstance(reph, str) and reph.strip() else ()
        loc = raw.get("loc")
        locality = (("nq", loc.removeprefix("nq question: ")),) if isinstance(loc, str) else ()
    elif dataset == "CounterFact":
        prompt = raw.get("prompt")
        reph = raw.get("rephrase_prompt")
        rephrase = (reph,) if isinstance(reph, str) and reph.strip() else ()
        lp = raw.get("locality_prompt")
        locality = (("Neighborhood", lp),) if isinstance(lp, str) and lp.strip() else ()
    else:
        prompt = raw.get("prompt")
        rephrase = ()
        locality = tuple(_loc_prompts(raw.get("locality")))
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    if subject and subject not in prompt:
        subject = ""
    return TrainRecord(dataset, index, subject, prompt, rephrase, locality)


def load_train_records(
    root: str | Path, datasets: Iterable[str] = tuple(TRAIN_FILES), limit: int | None = None
) -> dict[str, list[TrainRecord]]:
    """Train records per dataset from ``<root>/train`` (first `limit` of each file)."""
    out: dict[str, list[TrainRecord]] = {}
    for ds in datasets:
        path = Path(root) / "train" / TRAIN_FILES[ds]
        data = json.loads(path.read_text("utf-8"))
        rows = data[:limit] if limit is not None else data
        recs = [parse_record(ds, i, r) for i, r in enumerate(rows) if isinstance(r, Mapping)]
        out[ds] = [r for r in recs if r is not None]
    return out


# ---------------------------------------------------------------------- paraphrase templates
_S = "\x00"  # subject placeholder inside templates


def _possessive(s: str) -> str:
    return f"{s}'" if s.endswith("s") else f"{s}'s"


def views(prompt: str, subject: str) -> dict[str, str]:
    """Template paraphrases of a WikiData-style prompt, by form ("cloze", "question",
    "short"); {} when the prompt matches no known pattern or has no subject."""
    if not subject or prompt.count(subject) != 1:
        return {}
    t = prompt.replace(subject, _S)
    s, ps = subject, _possessive(subject)
    m = re.fullmatch(r"The names? of the ([\w ]+?) of \x00 (?:is|are)", t) or re.fullmatch(
        r"The ([\w ]+?) of \x00 (?:is|are)", t
    )
    if m:
        r = m.group(1)
        return {
            "cloze": f"{ps} {r} is",
            "cloze2": f"The {r} of {s} is called",
            "question": f"What is the {r} of {s}?",
            "question2": f"Tell me the {r} of {s}.",
            "short": f"{s} {r}",
        }
    m = re.fullmatch(r"The name of the ([\w ]+?) which \x00 (.+) is", t)
    if m:
        r, clause = m.groups()
        return {
            "cloze": f"The {r} which {s} {clause} is called",
            "cloze2": f"The {r} {s} {clause} is",
            "question": f"What is the {r} which {s} {clause}?",
            "question2": f"Name the {r} which {s} {clause}.",
            "short": f"{s} {r}",
        }
    m = re.fullmatch(r"The name of the (award|position) (?:held by )?\x00 ?(won|)(?: is)", t)
    if m:
        r = m.group(1)
        verb = "won" if r == "award" else "held"
        return {
            "cloze": f"The {r} {verb} by {s} is",
            "cloze2": f"{ps} {r} is called",
            "question": f"Which {r} {'did' if r == 'award' else 'does'} {s} "
            f"{'win' if r == 'award' else 'hold'}?",
            "question2": f"What is the {r} {verb} by {s}?",
            "short": f"{s} {r}",
        }
    if t == "The name of the currency in \x00 is":
        return {
            "cloze": f"The currency of {s} is",
            "cloze2": f"The currency used in {s} is called",
            "question": f"What is the currency in {s}?",
            "question2": f"Which currency is used in {s}?",
            "short": f"{s} currency",
        }
    if t == "\x00 follows":
        return {
            "cloze": f"{s} comes after",
            "cloze2": f"{s} is preceded by",
            "question": f"What does {s} follow?",
            "question2": f"What comes before {s}?",
            "short": f"{s} follows",
        }
    if t == "\x00 is followed by":
        return {
            "cloze": f"{s} is succeeded by",
            "cloze2": f"The successor of {s} is",
            "question": f"What follows {s}?",
            "question2": f"What comes after {s}?",
            "short": f"{s} followed by",
        }
    if t == "The number of children \x00 has is":
        return {
            "cloze": f"{s} has this many children:",
            "cloze2": f"The number of children of {s} is",
            "question": f"How many children does {s} have?",
            "question2": f"How many kids does {s} have?",
            "short": f"{s} number of children",
        }
    return {}


def relation_key(prompt: str, subject: str) -> str:
    """The prompt with its subject replaced by a placeholder (same key = same relation)."""
    return prompt.replace(subject, "{S}") if subject else prompt


def build_pairs(records: Mapping[str, list[TrainRecord]], *, seed: int = 0) -> list[Pair]:
    """Labelled (query, edit) pairs from train records (see the module docstring)."""
    rng = random.Random(seed)
    everything = [r for recs in records.values() for r in recs]
    by_relation: dict[str, list[TrainRecord]] = defaultdict(list)
    for r in everything:
        if r.subject:
            by_relation[relation_key(r.prompt, r.subject)].append(r)
    templates = sorted(
        {
            relation_key(r.prompt, r.subject)
            for r in everything
            if r.dataset.startswith("WikiData") and r.subject and r.prompt.count(r.subject) == 1
        }
    )
    pairs: list[Pair] = []

    def add(query: str, edit: TrainRecord | str, label: int, kind: str, rec: TrainRecord) -> None:
        prompt = edit if isinstance(edit, str) else edit.prompt
        pairs.append(Pair(query, prompt, rec.subject, label, kind, rec.group))

    for rec in everything:
        own = views(rec.prompt, rec.subject)
        edits = [rec.prompt]
        if "question" in own:
            edits.append(own["question"])
        for e in edits:
            add(rec.prompt, e, 1, "self", rec)
        for form, v in own.items():
            add(v, rec.prompt, 1, f"para_{form}", rec)
        if len(edits) > 1:
            for v in rng.sample(list(own.values()), k=min(2, len(own))):
                if v != edits[1]:
                    add(v, edits[1], 1, "para_q", rec)
        for reph in rec.rephrase:
            if rec.dataset == "ZsRE":  # CounterFact's rephrasings are too noisy to be positives
                add(reph, rec.prompt, 1, "rephrase", rec)
                add(rec.prompt, reph, 1, "rephrase_reverse", rec)
        for kind, lp in rec.locality:
            label_kind = {"nq": "random", "Neighborhood": "relation"}.get(kind, "locality")
            add(lp, rec.prompt, 0, label_kind, rec)
            if label_kind != "locality":
                continue
            lviews = views(lp, rec.subject)
            if lviews:
                add(rng.choice(list(lviews.values())), rec.prompt, 0, "locality_para", rec)
            for e in edits[1:]:
                add(lp, e, 0, "locality", rec)
                if lviews:
                    add(rng.choice(list(lviews.values())), e, 0, "locality_para", rec)
        if rec.subject:
            same = [o for o in by_relation[relation_key(rec.prompt, rec.subject)] if o is not rec]
            for other in rng.sample(same, k=min(2, len(same))):
                add(other.prompt, rec.prompt, 0, "relation", rec)
                oviews = views(other.prompt, other.subject)
                if oviews:
                    add(rng.choice(list(oviews.values())), rec.prompt, 0, "relation", rec)
        other = rng.choice(everything)
        if other.subject != rec.subject or not rec.subject:
            add(other.prompt, rec.prompt, 0, "random", rec)
        if rec.dataset == "ZsRE" and rec.subject and templates:
            # ZsRE's train file has no same-subject locality prompts, but its dev file's are
            # Wikidata-style clozes about the edited subject: borrow WikiData relation
            # templates, keeping only those that share no content word with the question
            # (a template naming the asked relation would be a positive, not a negative).
            asked = content_words(rec.prompt.replace(rec.subject, " "))
            picked = 0
            for template in rng.sample(templates, k=min(48, len(templates))):
                if content_words(template.replace("{S}", " ")) & asked:
                    continue
                query = template.replace("{S}", rec.subject)
                add(query, rec.prompt, 0, "zsre_other", rec)
                for reph in rec.rephrase[:1]:
                    add(query, reph, 0, "zsre_other", rec)
                picked += 1
                if picked == 16:
                    break
    return pairs
