"""Core value types: what a user asks to change (`EditRequest`) and what was applied.

Both are plain, validated dataclasses that round-trip through JSON, so the SQL edit log, the
HTTP service and the evaluator all speak the same language.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from memedit.errors import InvalidRequestError

#: Longest string accepted in any text field of a request (characters). Keeps one bad request
#: from filling the log or the model's context.
MAX_TEXT_CHARS = 4096

STRATEGIES = ("memory", "adapter", "weights")
#: The in-weight method `EditableModel.edit(..., strategy="weights")` uses when none is named.
DEFAULT_WEIGHTS_METHOD = "rome"


def _check_text(field_name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        msg = f"{field_name} must be a string, got {type(value).__name__} ({value!r:.80})"
        raise InvalidRequestError(msg, field=field_name, value=value)
    if not allow_empty and not value.strip():
        msg = f"{field_name} must not be empty or whitespace, got {value!r}"
        raise InvalidRequestError(msg, field=field_name, value=value)
    if len(value) > MAX_TEXT_CHARS:
        msg = f"{field_name} is {len(value)} characters long; the limit is {MAX_TEXT_CHARS}"
        raise InvalidRequestError(msg, field=field_name, value=value[:80] + "…")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        msg = (
            f"{field_name} is not valid UTF-8 text "
            f"(bad code point at index {exc.start}): {value!r:.80}"
        )
        raise InvalidRequestError(msg, field=field_name, value=value) from exc
    if "\x00" in value:
        msg = f"{field_name} contains a NUL character: {value!r:.80}"
        raise InvalidRequestError(msg, field=field_name, value=value)
    return value


@dataclass(frozen=True)
class Probe:
    """A follow-up question attached to an edit (a locality or portability check)."""

    prompt: str
    answers: tuple[str, ...]
    kind: str = ""

    def __post_init__(self) -> None:
        _check_text("probe.prompt", self.prompt)
        answers = (self.answers,) if isinstance(self.answers, str) else tuple(self.answers)
        for i, a in enumerate(answers):
            _check_text(f"probe.answers[{i}]", a, allow_empty=True)
        object.__setattr__(self, "answers", answers)


@dataclass(frozen=True)
class EditRequest:
    """One fact to insert, modify or erase.

    ``prompt`` is the question or cloze the fact answers ("The place of death of Leo Arons is"),
    ``subject`` the entity it is about and must occur in ``prompt``, ``target_new`` the answer the
    model should give from now on. ``ground_truth`` is the old answer where known, ``rephrase``
    paraphrases of the prompt, ``locality``/``portability`` follow-up probes used by evaluation.
    """

    prompt: str
    target_new: str
    subject: str = ""
    ground_truth: tuple[str, ...] = ()
    rephrase: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt)
        _check_text("target_new", self.target_new)
        _check_text("subject", self.subject, allow_empty=True)
        if self.subject and self.subject not in self.prompt:
            msg = f"subject {self.subject!r} does not occur in prompt {self.prompt!r}"
            raise InvalidRequestError(msg, field="subject", value=self.subject)
        for name in ("ground_truth", "rephrase"):
            raw = getattr(self, name)
            items = (raw,) if isinstance(raw, str) else tuple(raw)
            for i, item in enumerate(items):
                _check_text(f"{name}[{i}]", item)
            object.__setattr__(self, name, items)
        for name in ("locality", "portability"):
            probes = tuple(getattr(self, name))
            for i, p in enumerate(probes):
                if not isinstance(p, Probe):
                    msg = f"{name}[{i}] must be a Probe, got {type(p).__name__}"
                    raise InvalidRequestError(msg, field=f"{name}[{i}]", value=p)
            object.__setattr__(self, name, probes)
        if not isinstance(self.meta, Mapping):
            msg = f"meta must be a mapping, got {type(self.meta).__name__}"
            raise InvalidRequestError(msg, field="meta", value=self.meta)
        try:
            json.dumps(dict(self.meta))
        except (TypeError, ValueError) as exc:
            msg = f"meta must be JSON-serialisable: {exc}"
            raise InvalidRequestError(msg, field="meta", value=self.meta) from exc

    @property
    def fact(self) -> str:
        """The edit as one sentence: the prompt followed by the new answer."""
        return f"{self.prompt.rstrip()} {self.target_new.strip()}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        """Build a request from a JSON-like mapping, naming the field that is wrong."""
        if not isinstance(data, Mapping):
            msg = f"an edit request must be a JSON object, got {type(data).__name__}"
            raise InvalidRequestError(msg, field="<request>", value=data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"unknown field(s) {unknown} in edit request; known fields: {sorted(known)}"
            raise InvalidRequestError(msg, field=unknown[0], value=data[unknown[0]])
        for required in ("prompt", "target_new"):
            if required not in data:
                msg = f"edit request is missing the required field {required!r}"
                raise InvalidRequestError(msg, field=required, value=None)
        kwargs = dict(data)
        for name in ("locality", "portability"):
            probes = kwargs.get(name, ())
            if not isinstance(probes, Sequence) or isinstance(probes, str):
                msg = f"{name} must be a list of probes, got {type(probes).__name__}"
                raise InvalidRequestError(msg, field=name, value=probes)
            kwargs[name] = tuple(
                p if isinstance(p, Probe) else _probe_from_dict(name, i, p)
                for i, p in enumerate(probes)
            )
        for name in ("ground_truth", "rephrase"):
            raw = kwargs.get(name, ())
            if raw is None:
                raw = ()
            if not isinstance(raw, (str, Sequence)):
                msg = f"{name} must be a string or a list of strings, got {type(raw).__name__}"
                raise InvalidRequestError(msg, field=name, value=raw)
            kwargs[name] = raw
        return cls(**kwargs)


def _probe_from_dict(name: str, i: int, data: object) -> Probe:
    if not isinstance(data, Mapping) or "prompt" not in data:
        msg = f"{name}[{i}] must be an object with 'prompt' and 'answers', got {data!r:.80}"
        raise InvalidRequestError(msg, field=f"{name}[{i}]", value=data)
    answers = data.get("answers", ())
    if isinstance(answers, str):
        answers = (answers,)
    return Probe(prompt=data["prompt"], answers=tuple(answers), kind=str(data.get("kind", "")))


@dataclass(frozen=True)
class EditRecord:
    """An applied edit as the edit log stores it."""

    id: int
    request: EditRequest
    strategy: str
    method: str
    created_at: datetime
    rolled_back_at: datetime | None = None
    batch_id: str = ""

    @property
    def active(self) -> bool:
        return self.rolled_back_at is None

    @property
    def status(self) -> str:
        return "active" if self.active else "rolled_back"


@dataclass(frozen=True)
class Hit:
    """One edit retrieved for a query, with its retrieval similarity."""

    record: EditRecord
    score: float


@dataclass(frozen=True)
class ScopeDecision:
    """Why a query was answered the way it was: the candidates, their scope scores, the verdict."""

    query: str
    in_scope: bool
    threshold: float
    candidates: tuple[Hit, ...] = ()
    scores: tuple[float, ...] = ()
    used_edit_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "in_scope": self.in_scope,
            "threshold": self.threshold,
            "candidates": [
                {"edit_id": h.record.id, "similarity": h.score, "scope": s}
                for h, s in zip(self.candidates, self.scores, strict=True)
            ],
            "used_edit_ids": list(self.used_edit_ids),
        }


@dataclass(frozen=True)
class Answer:
    """What `EditableModel.generate`/`chat` return: the text and the routing decision behind it."""

    text: str
    decision: ScopeDecision
    prompt: str = ""
