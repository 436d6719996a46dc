"""KnowEdit records as `EditRequest`s (the fact-editing datasets; the evaluator extends this).

Upstream values are kept as they are where possible: an answer given as a list of alias lists
becomes the first list's aliases, a subject that does not occur in its prompt (the data has a
few) is kept in ``meta["subject"]`` and left out of the request's ``subject`` so validation
does not reject a benchmark record. A malformed file or record raises `InvalidRequestError`
naming the file, record index and field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memedit.errors import InvalidRequestError
from memedit.paths import knowedit_dir
from memedit.types import EditRequest, Probe

#: Datasets whose records are single facts (prompt → target) that every strategy can take.
FACT_DATASETS = ("ZsRE", "WikiData_counterfact", "WikiData_recent", "CounterFact")


def _answers(value: object) -> tuple[str, ...]:
    """Normalise an upstream answer field to a tuple of aliases of the first answer."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence):
        if not value:
            return ()
        first = value[0]
        if isinstance(first, Sequence) and not isinstance(first, str):
            return tuple(str(a) for a in first)
        return tuple(str(a) for a in value)
    return (str(value),)


def _probes(block: object, where: str) -> tuple[Probe, ...]:
    if block is None or block == {}:
        return ()
    if not isinstance(block, Mapping):
        msg = f"{where} must be an object of probe lists, got {type(block).__name__}"
        raise InvalidRequestError(msg, field=where, value=block)
    out: list[Probe] = []
    for kind, items in block.items():
        entries = [items] if isinstance(items, Mapping) else items
        if not isinstance(entries, Sequence):
            msg = f"{where}.{kind} must be a list, got {type(entries).__name__}"
            raise InvalidRequestError(msg, field=f"{where}.{kind}", value=entries)
        for i, item in enumerate(entries):
            if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str):
                msg = f"{where}.{kind}[{i}] must be an object with a 'prompt' string"
                raise InvalidRequestError(msg, field=f"{where}.{kind}[{i}]", value=item)
            if not item["prompt"].strip():
                continue
            out.append(Probe(item["prompt"], _answers(item.get("ground_truth")), str(kind)))
    return tuple(out)


def record_to_request(dataset: str, record: Mapping[str, Any]) -> EditRequest:
    """Convert one upstream record of a fact dataset into an `EditRequest`."""
    if not isinstance(record, Mapping):
        msg = f"a {dataset} record must be a JSON object, got {type(record).__name__}"
        raise InvalidRequestError(msg, field="<record>", value=record)
    for required in ("prompt", "target_new"):
        if not isinstance(record.get(required), str):
            msg = f"{dataset} record has no {required!r} string (got {record.get(required)!r:.60})"
            raise InvalidRequestError(msg, field=required, value=record.get(required))
    prompt: str = record["prompt"]
    subject = str(record.get("subject") or "")
    meta: dict[str, Any] = {"dataset": dataset}
    if subject and subject not in prompt:
        meta["subject"] = subject
        subject = ""
    rephrase: list[str] = []
    for key in ("rephrase_prompt", "rephrase"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            rephrase.append(value)
        elif isinstance(value, list):
            rephrase.extend(v for v in value if isinstance(v, str) and v.strip())
    locality = _probes(record.get("locality"), "locality")
    if isinstance(record.get("locality_prompt"), str):
        answers = _answers(record.get("locality_ground_truth"))
        locality += (Probe(record["locality_prompt"], answers, "Neighborhood"),)
    return EditRequest(
        prompt=prompt,
        target_new=record["target_new"],
        subject=subject,
        ground_truth=_answers(record.get("ground_truth")),
        rephrase=tuple(rephrase),
        locality=locality,
        portability=_probes(record.get("portability"), "portability"),
        meta=meta,
    )


def dataset_path(dataset: str, split: str = "dev", root: str | Path | None = None) -> Path:
    """Path of a KnowEdit file (`split` = "dev"; train files differ per dataset)."""
    base = Path(root) if root is not None else knowedit_dir()
    if split != "dev":
        msg = f"split {split!r} is not supported here; use 'dev'"
        raise InvalidRequestError(msg, field="split", value=split)
    path = base / "dev" / f"{dataset}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (base / "dev").glob("*.json"))
        msg = f"dataset {dataset!r} not found at {path}; known: {known}"
        raise InvalidRequestError(msg, field="dataset", value=dataset)
    return path


def load_requests(
    dataset: str,
    *,
    split: str = "dev",
    limit: int | None = None,
    root: str | Path | None = None,
) -> list[EditRequest]:
    """Load a KnowEdit fact dataset as requests, in file order (first `limit` records)."""
    if dataset not in FACT_DATASETS:
        msg = f"dataset {dataset!r} is not a fact dataset; choose one of {list(FACT_DATASETS)}"
        raise InvalidRequestError(msg, field="dataset", value=dataset)
    path = dataset_path(dataset, split, root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} is not valid UTF-8 JSON: {exc}"
        raise InvalidRequestError(msg, field="<file>", value=str(path)) from exc
    if not isinstance(data, list):
        msg = f"{path} must hold a JSON list of records, got {type(data).__name__}"
        raise InvalidRequestError(msg, field="<file>", value=str(path))
    out: list[EditRequest] = []
    for i, record in enumerate(data[:limit] if limit is not None else data):
        try:
            out.append(record_to_request(dataset, record))
        except InvalidRequestError as exc:
            msg = f"{path}, record {i}, field {exc.field!r}: {exc}"
            raise InvalidRequestError(msg, field=exc.field, value=exc.value) from exc
    return out
