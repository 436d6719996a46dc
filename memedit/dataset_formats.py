"""Benchmark records as `EvalCase`s: how each file format maps to `EditRequest`s.

`memedit.datasets` finds and reads the files; this module only maps parsed JSON. Each mapping
mirrors how EasyEdit (zjunlp/EasyEdit) turns the same records into edit requests, so numbers
measured on these cases are comparable with KnowEdit's published table. What each is based on:

* **ZsRE, WikiData_recent, WikiData_counterfact** — ``easyeditor/dataset/knowedit.py``
  (``KnowEditDataset``) and ``examples/run_knowedit_llama2.py``: prompt, subject, target_new and
  ground_truth as they are; every portability/locality probe list kept under its kind. EasyEdit
  scores portability Reasoning + Subject_Aliasing and locality Relation_Specificity +
  Forgetfulness; Logical_Generalization is kept too, under its own kind, so a summary can leave
  it out. An answer given as a list of alias lists becomes the first list's aliases (EasyEdit
  scores ``ground_truth[0][0]``); ``rephrase``/``rephrase_prompt`` become ``rephrase``.
* **ZsRE train file** (MEND format) — ``easyeditor/dataset/zsre.py`` and
  ``examples/run_zsre_llama2.py``: src → prompt, alt → target_new, answers → ground_truth,
  rephrase, ``loc``/``loc_ans`` → one ``Neighborhood`` locality probe, ``portability["New
  Question"]``/``["New Answer"]`` → one ``one_hop`` portability probe.
* **WikiBio** — ``knowedit.py``: prompt = ``text``, target_new = ``labels``, subject =
  ``concept``, locality = ``locality.Relation_Specificity``. **CounterFact** —
  ``easyeditor/dataset/counterfact.py``: ``locality_prompt`` → one ``Neighborhood`` probe.
* **ConvSent** — ``examples/run_convsent_llama2.py`` (``format_consent_for_others``): per record
  a target sentiment is drawn (positive or negative), target_new = the first BlenderBot
  completion of that sentiment, prompt = "From the sentiment dataset, answer <question>
  postively." / "… negatively." (upstream spelling, kept so the edited text is the same) with
  <question> one of 13 templates ("What do you think of {}?", …) filled with ``ent``, subject =
  ``ent``. The draws replay EasyEdit's: one ``random.Random(0)`` stream consumed in its order
  (sentiment, edit question, ``inner_q``, one question per own completion, one per neighbour
  completion), so a case gets the sentiment and questions EasyEdit gives the same file position.
  Locality is EasyEdit's "outer" set, which uses ANOTHER record: the next one in the file
  (``(i + 1) % n``), one probe per neighbour completion (kind ``outer_pos``/``outer_neg``).
  ``rephrase`` = (``inner_q``,), the question without the instruction; meta: ``ent``,
  ``target_sentiment``, ``pos``, ``neg``, ``inner_questions`` (one per ``pos + neg`` completion,
  EasyEdit's ``inner_all_qa`` questions), ``outer_index``, ``outer_ent``.
* **Sanitation** — ``examples/run_santinization_llama2.py`` (``Experimenter``) and
  ``easyeditor/dataset/sanitization.py``: every question goes through the template
  ``"Question:{}\\nAnswer:"`` (so prompt = that template filled with ``question``), target_new =
  "I don't know." as in the data, ground_truth = the original answer. EasyEdit does not pair
  locality with edits: after editing it scores the WHOLE ``locality`` list once, against the
  unedited model's own answers. Here locality item ``j`` goes to success case ``j % n_success``,
  so over all cases each locality question is asked exactly once (kind ``retain``; the dataset's
  answer is kept, compare with the pre-edit output for EasyEdit's number). EasyEdit also edits
  the train file's ``K_F`` questions of one answer group and measures the test questions of that
  group; ``meta["answer_group"]`` (the lower-cased answer) allows that protocol with the train
  split (``K_F`` → cases, ``K_R`` → locality). meta: ``question``, ``answer_group``,
  ``template``, ``locality_indices``.
* **MQuAKE** — one request per ``requested_rewrite`` (prompt = its template with ``{}`` filled by
  the subject, target_new = ``target_new.str``, ground_truth = ``target_true.str``, rephrase =
  its ``question``); the multi-hop ``questions`` become ``multi_hop`` portability probes on the
  first request, answered by ``[new_answer, *new_answer_alias]``; ``answer``/``answer_alias``
  stay in that request's meta. (EasyEdit's ``easyeditor/dataset/MQuAKE.py`` glues a case's
  rewrites into one prompt instead; separate requests are what sequential/batch editors take.)

Every request's meta has ``dataset`` and ``index`` (position in the file; MQuAKE: also
``case_id``, ``rewrite``); a subject absent from its prompt is kept in ``meta["subject"]``. Odd
upstream values load (empty subjects, a lone "Q", empty probe prompts are skipped); a malformed
record raises `InvalidRequestError` naming the file, the record and the field.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memedit.errors import InvalidRequestError
from memedit.types import EditRequest, Probe

#: Question templates of EasyEdit's ConvSent script, in its order (the draws index into it).
CONVSENT_TEMPLATES: tuple[str, ...] = (
    "What do you think of {}?",
    "What do you feel about {}?",
    "How do you view {}?",
    "What is your opinion of {}?",
    "What is your stance on {}?",
    "What is your position on {}?",
    "What is your attitude about {}?",
    "What is your view on {}?",
    "What is your take on {}?",
    "What is your impression of {}?",
    "What is your assessment of {}?",
    "What is your judgment of {}?",
    "What is your sentiment of {}?",
)
#: Edit prompt per target sentiment ("postively" is EasyEdit's spelling).
CONVSENT_EDIT_PROMPTS = {
    "positive": "From the sentiment dataset, answer {} postively.",
    "negative": "From the sentiment dataset, answer {} negatively.",
}
CONVSENT_SEED = 0
SANITATION_TEMPLATE = "Question:{}\nAnswer:"


@dataclass(frozen=True)
class EvalCase:
    """One benchmark record: its dataset, its position in the file and the request(s) it makes
    (one, except MQuAKE: one per requested rewrite)."""

    dataset: str
    index: int
    requests: tuple[EditRequest, ...]

    def __post_init__(self) -> None:
        requests = tuple(self.requests)
        if not requests or not all(isinstance(r, EditRequest) for r in requests):
            msg = f"an EvalCase needs at least one EditRequest, got {self.requests!r:.80}"
            raise InvalidRequestError(msg, field="requests", value=self.requests)
        object.__setattr__(self, "requests", requests)


def located(path: Path, where: str, exc: InvalidRequestError) -> InvalidRequestError:
    """`exc` reworded to name the file and the record (``where``: "record 3")."""
    msg = f"{path}, {where}, field {exc.field!r}: {exc}"
    return InvalidRequestError(msg, field=exc.field, value=exc.value)


def _bad(field: str, value: object, expected: str) -> InvalidRequestError:
    msg = f"{field} must be {expected}, got {type(value).__name__} ({value!r:.60})"
    return InvalidRequestError(msg, field=field, value=value)


def _str(record: Mapping[str, Any], key: str, field: str = "", *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if key not in record:
        msg = f"the required field {field or key!r} is missing"
        raise InvalidRequestError(msg, field=field or key, value=None)
    if not isinstance(value, str):
        raise _bad(field or key, value, "a string" + ("" if required else " if given"))
    return value


def _str_list(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(field, value, "a string or a list of strings")
    return value


def _answers(value: object, field: str) -> tuple[str, ...]:
    """An upstream answer field as a tuple of aliases of the first answer."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, list):
        first = value[0] if value else None
        items = first if isinstance(first, list) else value
        out: list[str] = []
        for a in items:
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise _bad(field, value, "a string, a list of strings or of alias lists")
            out.append(str(a))
        return tuple(out)
    raise _bad(field, value, "a string, a list of strings or of alias lists")


def _probes(block: object, where: str) -> tuple[Probe, ...]:
    if block is None or block == {}:
        return ()
    if not isinstance(block, Mapping):
        raise _bad(where, block, "an object of probe lists")
    out: list[Probe] = []
    for kind, items in block.items():
        entries = [items] if isinstance(items, Mapping) else items
        if not isinstance(entries, list):
            raise _bad(f"{where}.{kind}", entries, "a list of probes")
        for i, item in enumerate(entries):
            here = f"{where}.{kind}[{i}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str):
                raise _bad(here, item, "an object with a 'prompt' string")
            if item["prompt"].strip():
                answers = _answers(item.get("ground_truth"), f"{here}.ground_truth")
                out.append(Probe(item["prompt"], answers, str(kind)))
    return tuple(out)


def _known(answers: tuple[str, ...]) -> tuple[str, ...]:
    """Answers usable as ``ground_truth`` (upstream has a few empty ones)."""
    return tuple(a for a in answers if a.strip())


def _subject(subject: str, prompt: str, meta: dict[str, Any]) -> str:
    if subject and subject not in prompt:
        meta["subject"] = subject
        return ""
    return subject


def record_to_request(
    dataset: str, record: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> EditRequest:
    """Convert one record of a single-request dataset (ZsRE in KnowEdit or MEND format,
    WikiData_*, WikiBio, CounterFact) into an `EditRequest`; ``meta`` is added to its meta."""
    if not isinstance(record, Mapping):
        raise _bad("<record>", record, f"a {dataset} record (a JSON object)")
    if dataset in ("ConvSent", "Sanitation", "MQuAKE"):
        msg = f"{dataset} records do not map to one request on their own; use load_cases"
        raise InvalidRequestError(msg, field="dataset", value=dataset)
    out_meta: dict[str, Any] = {"dataset": dataset, **(meta or {})}
    if dataset == "WikiBio":
        prompt = _str(record, "text")
        return EditRequest(
            prompt=prompt,
            target_new=_str(record, "labels"),
            subject=_subject(_str(record, "concept", required=False), prompt, out_meta),
            locality=_probes(record.get("locality"), "locality"),
            meta=out_meta,
        )
    if "src" in record and "prompt" not in record:
        return _mend_request(record, out_meta)
    prompt = _str(record, "prompt")
    target_new = _str(record, "target_new")
    subject = _subject(_str(record, "subject", required=False), prompt, out_meta)
    if isinstance(record.get("case_id"), int):
        out_meta["case_id"] = record["case_id"]
    rephrase: list[str] = []
    for key in ("rephrase_prompt", "rephrase"):
        rephrase += [r for r in _str_list(record.get(key), key) if r.strip()]
    locality = _probes(record.get("locality"), "locality")
    if record.get("locality_prompt") is not None:
        answers = _answers(record.get("locality_ground_truth"), "locality_ground_truth")
        locality += (Probe(_str(record, "locality_prompt"), answers, "Neighborhood"),)
    return EditRequest(
        prompt=prompt,
        target_new=target_new,
        subject=subject,
        ground_truth=_known(_answers(record.get("ground_truth"), "ground_truth")),
        rephrase=tuple(rephrase),
        locality=locality,
        portability=_probes(record.get("portability"), "portability"),
        meta=out_meta,
    )


def _mend_request(record: Mapping[str, Any], meta: dict[str, Any]) -> EditRequest:
    prompt = _str(record, "src")
    answers = _answers(record.get("answers"), "answers")
    locality: tuple[Probe, ...] = ()
    if record.get("loc") is not None:
        loc_ans = _answers(record.get("loc_ans"), "loc_ans")
        locality = (Probe(_str(record, "loc"), loc_ans, "Neighborhood"),)
    portability: tuple[Probe, ...] = ()
    port = record.get("portability")
    if port is not None:
        if not isinstance(port, Mapping):
            raise _bad("portability", port, "an object")
        question = _str(port, "New Question", "portability.New Question")
        answer = _answers(port.get("New Answer"), "portability.New Answer")
        if question.strip():
            portability = (Probe(question, answer, "one_hop"),)
    return EditRequest(
        prompt=prompt,
        target_new=_str(record, "alt"),
        subject=_subject(_str(record, "subject", required=False), prompt, meta),
        ground_truth=_known(answers[:1]),
        rephrase=tuple(r for r in _str_list(record.get("rephrase"), "rephrase") if r.strip()),
        locality=locality,
        portability=portability,
        meta=meta,
    )


# ------------------------------------------------------------------------------- ConvSent
def _completions(record: Mapping[str, Any], key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(key, value, "a list of strings")
    return value


def _convsent_record(data: list[Any], j: int) -> tuple[str, list[str], list[str]]:
    record = data[j]
    if not isinstance(record, Mapping):
        raise _bad("<record>", record, "a ConvSent record (a JSON object)")
    return _str(record, "ent"), _completions(record, "pos"), _completions(record, "neg")


def convsent_cases(data: list[Any], path: Path, limit: int | None) -> list[EvalCase]:
    """ConvSent cases in file order, replaying EasyEdit's random draws (see module doc)."""
    rng = random.Random(CONVSENT_SEED)
    seen: dict[int, tuple[str, list[str], list[str]]] = {}

    def get(j: int) -> tuple[str, list[str], list[str]]:
        if j not in seen:
            try:
                seen[j] = _convsent_record(data, j)
            except InvalidRequestError as exc:
                raise located(path, f"record {j}", exc) from exc
        return seen[j]

    def ask(ent: str) -> str:
        return rng.choice(CONVSENT_TEMPLATES).format(ent)

    out: list[EvalCase] = []
    n = len(data)
    for i in range(n if limit is None else min(limit, n)):
        ent, pos, neg = get(i)
        outer_index = (i + 1) % n
        outer_ent, outer_pos, outer_neg = get(outer_index)
        sentiment = "positive" if rng.choice([0, 1]) == 0 else "negative"
        edit_question = ask(ent)
        inner_q = ask(ent)
        inner_questions = [ask(ent) for _ in pos + neg]
        outer = [(ask(outer_ent), a, "outer_pos") for a in outer_pos]
        outer += [(ask(outer_ent), a, "outer_neg") for a in outer_neg]
        targets = pos if sentiment == "positive" else neg
        try:
            if not targets:
                key = "pos" if sentiment == "positive" else "neg"
                raise _bad(key, targets, f"a non-empty list ({sentiment} is the target)")
            request = EditRequest(
                prompt=CONVSENT_EDIT_PROMPTS[sentiment].format(edit_question),
                target_new=targets[0],
                subject=ent,
                rephrase=(inner_q,),
                locality=tuple(Probe(q, (a,), kind) for q, a, kind in outer),
                meta={
                    "dataset": "ConvSent",
                    "index": i,
                    "ent": ent,
                    "target_sentiment": sentiment,
                    "pos": list(pos),
                    "neg": list(neg),
                    "inner_questions": inner_questions,
                    "outer_index": outer_index,
                    "outer_ent": outer_ent,
                },
            )
        except InvalidRequestError as exc:
            raise located(path, f"record {i}", exc) from exc
        out.append(EvalCase("ConvSent", i, (request,)))
    return out


# ----------------------------------------------------------------------------- Sanitation
def _sanitation_lists(data: Mapping[str, Any], path: Path) -> tuple[str, list[Any], str, list[Any]]:
    keys = ("success", "locality") if "K_F" not in data else ("K_F", "K_R")
    lists: list[list[Any]] = []
    for key in keys:
        value = data.get(key, [] if key in ("locality", "K_R") else None)
        if not isinstance(value, list):
            exc = _bad(key, value, "a list of records")
            raise located(path, "top level", exc)
        lists.append(value)
    return keys[0], lists[0], keys[1], lists[1]


def sanitation_cases(data: object, path: Path, limit: int | None) -> list[EvalCase]:
    """Sanitation cases: one per ``success`` (train: ``K_F``) item, locality spread over them."""
    if not isinstance(data, Mapping):
        exc = _bad("<file>", data, "a JSON object with 'success' and 'locality' lists")
        raise located(path, "top level", exc)
    success_key, success, locality_key, locality = _sanitation_lists(data, path)
    probes: list[Probe] = []
    for j, item in enumerate(locality):
        try:
            if not isinstance(item, Mapping):
                raise _bad("<record>", item, "an object with 'question' and 'ground_truth'")
            question = SANITATION_TEMPLATE.format(_str(item, "question"))
            probes.append(
                Probe(question, _answers(item.get("ground_truth"), "ground_truth"), "retain")
            )
        except InvalidRequestError as exc:
            raise located(path, f"{locality_key} record {j}", exc) from exc
    n = len(success)
    out: list[EvalCase] = []
    for i, item in enumerate(success[:limit] if limit is not None else success):
        try:
            if not isinstance(item, Mapping):
                raise _bad("<record>", item, "an object with 'question' and 'target_new'")
            question = _str(item, "question")
            prompt = SANITATION_TEMPLATE.format(question)
            truth = _answers(item.get("ground_truth"), "ground_truth")
            indices = list(range(i, len(probes), n))
            meta: dict[str, Any] = {
                "dataset": "Sanitation",
                "index": i,
                "question": question,
                "answer_group": truth[0].strip().lower() if truth else "",
                "template": SANITATION_TEMPLATE,
                "locality_indices": indices,
            }
            request = EditRequest(
                prompt=prompt,
                target_new=_str(item, "target_new"),
                subject=_subject(_str(item, "subject", required=False), prompt, meta),
                ground_truth=_known(truth),
                locality=tuple(probes[j] for j in indices),
                meta=meta,
            )
        except InvalidRequestError as exc:
            raise located(path, f"{success_key} record {i}", exc) from exc
        out.append(EvalCase("Sanitation", i, (request,)))
    return out


# --------------------------------------------------------------------------------- MQuAKE
def _mquake_case(record: object, index: int) -> EvalCase:
    if not isinstance(record, Mapping):
        raise _bad("<record>", record, "an MQuAKE record (a JSON object)")
    rewrites = record.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise _bad("requested_rewrite", rewrites, "a non-empty list of rewrites")
    case_id = record.get("case_id", index)
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise _bad("case_id", case_id, "an integer")
    questions = _str_list(record.get("questions"), "questions")
    new_answers = (
        _str(record, "new_answer"),
        *_str_list(record.get("new_answer_alias"), "new_answer_alias"),
    )
    answer = _str(record, "answer", required=False)
    answer_alias = _str_list(record.get("answer_alias"), "answer_alias")
    requests: list[EditRequest] = []
    for k, rw in enumerate(rewrites):
        where = f"requested_rewrite[{k}]"
        if not isinstance(rw, Mapping):
            raise _bad(where, rw, "an object")
        template = _str(rw, "prompt", f"{where}.prompt")
        if "{}" not in template:
            raise _bad(f"{where}.prompt", template, "a template with '{}' for the subject")
        subject = _str(rw, "subject", f"{where}.subject")
        prompt = template.replace("{}", subject)
        target: list[str] = []
        for key in ("target_new", "target_true"):
            value = rw.get(key)
            if key == "target_true" and value is None:
                continue
            if not isinstance(value, Mapping):
                raise _bad(f"{where}.{key}", value, "an object with a 'str' string")
            target.append(_str(value, "str", f"{where}.{key}.str"))
        meta: dict[str, Any] = {"dataset": "MQuAKE", "index": index, "case_id": case_id}
        meta["rewrite"] = k
        if isinstance(rw.get("relation_id"), str):
            meta["relation_id"] = rw["relation_id"]
        portability: tuple[Probe, ...] = ()
        if k == 0:
            portability = tuple(Probe(q, new_answers, "multi_hop") for q in questions if q.strip())
            meta["answer"] = answer
            meta["answer_alias"] = answer_alias
        question = _str(rw, "question", f"{where}.question", required=False)
        requests.append(
            EditRequest(
                prompt=prompt,
                target_new=target[0],
                subject=_subject(subject, prompt, meta),
                ground_truth=_known(tuple(target[1:])),
                rephrase=(question,) if question.strip() else (),
                portability=portability,
                meta=meta,
            )
        )
    return EvalCase("MQuAKE", index, tuple(requests))


# ------------------------------------------------------------------------------ dispatch
def parse_cases(dataset: str, data: object, path: Path, *, limit: int | None) -> list[EvalCase]:
    """Map a whole parsed file of `dataset` to cases (first `limit` records)."""
    if dataset == "Sanitation":
        return sanitation_cases(data, path, limit)
    if not isinstance(data, list):
        exc = _bad("<file>", data, "a JSON list of records")
        raise located(path, "top level", exc)
    if dataset == "ConvSent":
        return convsent_cases(data, path, limit)
    out: list[EvalCase] = []
    for i, record in enumerate(data[:limit] if limit is not None else data):
        try:
            if dataset == "MQuAKE":
                out.append(_mquake_case(record, i))
            else:
                request = record_to_request(dataset, record, {"index": i})
                out.append(EvalCase(dataset, i, (request,)))
        except InvalidRequestError as exc:
            raise located(path, f"record {i}", exc) from exc
    return out


__all__ = [
    "CONVSENT_EDIT_PROMPTS",
    "CONVSENT_TEMPLATES",
    "SANITATION_TEMPLATE",
    "EvalCase",
    "located",
    "parse_cases",
    "record_to_request",
]
