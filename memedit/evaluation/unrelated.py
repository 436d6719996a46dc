"""Unrelated locality probes: the WISE paper's ZsRE locality beside KnowEdit's.

KnowEdit's ZsRE locality asks the edited subject another relation. WISE (Wang et al. 2024) and
EasyEdit's WISE runner score locality on unrelated Natural Questions instead: MEND's ZsRE
records carry one each (``loc``, "nq question: who is the quarterback for the green bay
packers", and ``loc_ans``). Our ZsRE *train* file is in MEND's format; its questions from record
`TRAIN_POOL` on are the probes (`memedit.dataset_formats` parses ``loc``/``loc_ans`` into the
request's one locality probe). With ``EvalOptions(unrelated="nq")`` the fact suite gives every
case one of them and scores it as ``unrelated/NQ`` (`memedit.evaluation.suites.FactSuite`).

The file is read from the KnowEdit directory (`memedit.paths.knowedit_dir`: the
``MEMEDIT_KNOWEDIT_DIR`` variable or ``../shared/knowedit``), whatever ``--data-dir`` a run
reads its datasets from, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from memedit.errors import InvalidRequestError
from memedit.types import Probe

__all__ = [
    "TRAIN_POOL",
    "UNRELATED_SOURCES",
    "UnrelatedSource",
    "check_unrelated",
    "unrelated_manifest",
    "unrelated_probe",
    "unrelated_source",
]

#: Records 0-63 of the ZsRE train file are the training pool methods may use (T-Patcher's
#: memory and WISE's irrelevant samples read the first 64 train records), so evaluation probes
#: are taken from record 64 on and never overlap them.
TRAIN_POOL = 64
#: Accepted values of ``EvalOptions.unrelated`` / ``memedit eval --unrelated``.
UNRELATED_SOURCES = ("nq",)
#: source -> (dataset whose train file holds the questions, metric kind: ``unrelated/<kind>``)
_FILES = {"nq": ("ZsRE", "NQ")}


@dataclass(frozen=True)
class UnrelatedSource:
    """The probes of one source: ``probes[j]`` is the question of file record ``first + j``."""

    name: str
    kind: str
    file: Path
    sha256: str
    first: int
    probes: tuple[Probe, ...]


def check_unrelated(name: str | None) -> None:
    """Raise `InvalidRequestError` (field ``unrelated``) unless `name` is None or a source."""
    if name is not None and name not in UNRELATED_SOURCES:
        msg = f"unknown unrelated source {name!r}; choose one of {list(UNRELATED_SOURCES)}"
        raise InvalidRequestError(msg, field="unrelated", value=name)


@cache
def unrelated_source(name: str) -> UnrelatedSource:
    """The probes of source `name` (read once per process): the locality question of every
    record of the train file from `TRAIN_POOL` on, as its ``kind``."""
    check_unrelated(name)
    from memedit.datasets import load_requests, resolve_dataset_file
    from memedit.paths import file_sha256

    dataset, kind = _FILES[name]
    path = resolve_dataset_file(dataset, "train")
    sha256 = file_sha256(path)
    requests = load_requests(dataset, split="train")
    probes = []
    for i, request in enumerate(requests[TRAIN_POOL:], start=TRAIN_POOL):
        answered = [p for p in request.locality if p.answers and p.answers[0].strip()]
        if not answered:
            msg = f"{path}: record {i} has no unrelated question with an answer (loc, loc_ans)"
            raise InvalidRequestError(msg, field="loc", value=i)
        probes.append(Probe(answered[0].prompt, answered[0].answers, kind))
    if not probes:
        msg = f"{path} has no records after the {TRAIN_POOL} of the training pool"
        raise InvalidRequestError(msg, field="unrelated", value=name)
    return UnrelatedSource(name, kind, path, sha256, TRAIN_POOL, tuple(probes))


def unrelated_probe(name: str, index: int) -> Probe:
    """The unrelated probe of the case at file index `index`: the question of train record
    ``TRAIN_POOL + index % (n - TRAIN_POOL)`` (n records in the file). Deterministic; the ZsRE
    train file has 264 records, so with more than 200 cases the probes repeat."""
    probes = unrelated_source(name).probes
    return probes[index % len(probes)]


def unrelated_manifest(name: str) -> dict[str, Any]:
    """What a run's manifest records of source `name`: the file, its sha256 and the records
    whose questions are the probes."""
    src = unrelated_source(name)
    return {
        "source": src.name,
        "file": str(src.file),
        "sha256": src.sha256,
        "records": [src.first, src.first + len(src.probes) - 1],
    }
