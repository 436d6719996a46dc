"""Benchmark files as `EvalCase`s / `EditRequest`s: the six KnowEdit datasets, CounterFact, MQuAKE.

`load_cases` reads a split of a dataset from a local directory in either of two layouts:

* ours (``../shared/knowedit``, the default root): ``dev/<Dataset>.json`` (the first 60% of each
  test file), ``train/<Dataset>/<train file>``, and ``test/<Dataset>.json`` where the held-back
  part is present;
* the full release as published (Hugging Face ``zjunlp/KnowEdit``: ``benchmark/ZsRE/
  ZsRE-test-all.json``, ``benchmark/wiki_recent/recent_test.json``, …; the same folders without
  ``benchmark/``; EasyEdit's README names ``convsent/`` and ``Sanitation/``; ModelScope's flat
  ``benchmark_wiki_recent_recent_test.json``; ``<Dataset>/<file>``), where ``split="dev"`` is the
  first 60% of the test file, cut as our dev files were, so both layouts give the same cases.

`load_hub_cases` downloads a file of ``zjunlp/KnowEdit`` and parses it the same way. How records
map to requests (and which EasyEdit code each mapping follows) is described in
`memedit.dataset_formats`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from memedit.dataset_formats import EvalCase, parse_cases, record_to_request
from memedit.errors import InvalidRequestError
from memedit.paths import knowedit_dir
from memedit.types import EditRequest

#: The six datasets of the KnowEdit benchmark (Zhang et al. 2024).
KNOWEDIT_DATASETS = (
    "WikiData_recent",
    "ZsRE",
    "WikiBio",
    "WikiData_counterfact",
    "ConvSent",
    "Sanitation",
)
#: Every dataset `load_cases` reads: KnowEdit's six, ROME's CounterFact (EasyEdit's split) and
#: MQuAKE.
DATASETS = (*KNOWEDIT_DATASETS, "CounterFact", "MQuAKE")
#: Datasets whose records are single facts (prompt → target) that every strategy can take.
FACT_DATASETS = ("ZsRE", "WikiData_counterfact", "WikiData_recent", "CounterFact")
SPLITS = ("dev", "test", "train")
HUB_REPO = "zjunlp/KnowEdit"

#: Files of the full release, by split, as paths in the ``zjunlp/KnowEdit`` dataset repository
#: (CounterFact and MQuAKE are not part of it: EasyEdit's data folder and the MQuAKE-hard file).
RELEASE_FILES: dict[str, dict[str, str]] = {
    "WikiData_recent": {
        "test": "benchmark/wiki_recent/recent_test.json",
        "train": "benchmark/wiki_recent/recent_train.json",
    },
    "ZsRE": {"test": "benchmark/ZsRE/ZsRE-test-all.json"},
    "WikiBio": {
        "test": "benchmark/WikiBio/wikibio-test-all.json",
        "train": "benchmark/WikiBio/wikibio-train-all.json",
    },
    "WikiData_counterfact": {
        "test": "benchmark/wiki_counterfact/test_cf.json",
        "train": "benchmark/wiki_counterfact/train_cf.json",
    },
    "ConvSent": {
        "test": "benchmark/Convsent/blender_test.json",
        "train": "benchmark/Convsent/blender_train.json",
    },
    "Sanitation": {
        "test": "benchmark/trivia/trivia_qa_test.json",
        "train": "benchmark/trivia/trivia_qa_train.json",
    },
    "CounterFact": {
        "test": "counterfact/counterfact-edit.json",
        "train": "counterfact/counterfact-train.json",
    },
    "MQuAKE": {"test": "MQuAKE/MQuAKE-hard.json"},
}
#: Train files of our layout (``train/<Dataset>/…``); ConvSent's 14k train file was not
#: recoverable, its validation file stands in.
_OUR_TRAIN = {
    "WikiData_recent": ("recent_train.json",),
    "ZsRE": ("zsre_mend_eval_portability_gpt4.not_in_test.json",),
    "WikiBio": ("wikibio-train-all.json",),
    "WikiData_counterfact": ("train_cf.json",),
    "ConvSent": ("blender_train.json", "blender_val.json"),
    "Sanitation": ("trivia_qa_train.json",),
    "CounterFact": ("counterfact-train.json",),
}
#: Folder names of EasyEdit's README layout where they differ from the hub's.
_EASYEDIT_DIRS = {"Convsent": "convsent", "trivia": "Sanitation"}


def _check(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        msg = f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}"
        raise InvalidRequestError(msg, field="dataset", value=dataset)
    if split not in SPLITS:
        msg = f"unknown split {split!r}; choose one of {list(SPLITS)}"
        raise InvalidRequestError(msg, field="split", value=split)


def _release_paths(dataset: str, split: str, base: Path) -> list[Path]:
    rel = RELEASE_FILES[dataset].get(split)
    if rel is None:
        return []
    folder, name = rel.rsplit("/", 1)
    inner = folder.removeprefix("benchmark/")
    out = [base / rel]
    if inner != folder:
        out += [base / inner / name, base / rel.replace("/", "_")]
    if inner in _EASYEDIT_DIRS:
        out.append(base / _EASYEDIT_DIRS[inner] / name)
    out.append(base / dataset / name)
    return out


def _candidates(dataset: str, split: str, base: Path) -> list[tuple[Path, bool]]:
    """Paths to try in order, each with whether it is a full test file to cut to dev."""
    if split == "train":
        ours = [base / "train" / dataset / name for name in _OUR_TRAIN.get(dataset, ())]
    else:
        ours = [base / split / f"{dataset}.json"]
    release = _release_paths(dataset, "test" if split == "dev" else split, base)
    out: list[tuple[Path, bool]] = []
    for path, cut in [(p, False) for p in ours] + [(p, split == "dev") for p in release]:
        if all(path != seen for seen, _ in out):
            out.append((path, cut))
    return out


def _resolve(dataset: str, split: str, root: str | Path | None) -> tuple[Path, bool]:
    _check(dataset, split)
    base = Path(root) if root is not None else knowedit_dir()
    candidates = _candidates(dataset, split, base)
    if not candidates:
        msg = f"{dataset!r} has no {split} split (no such file is published)"
        raise InvalidRequestError(msg, field="split", value=split)
    for path, cut in candidates:
        if path.is_file():
            return path, cut
    tried = ", ".join(str(p) for p, _ in candidates)
    msg = f"no {split} file of {dataset!r} under {base}; tried: {tried}"
    raise InvalidRequestError(msg, field="dataset", value=dataset)


def resolve_dataset_file(dataset: str, split: str = "dev", root: str | Path | None = None) -> Path:
    """The file holding `split` of `dataset` under `root` (default `knowedit_dir()`), in our
    layout or the full release's; raises `InvalidRequestError` listing the paths tried. For
    ``split="dev"`` in the full release this is the test file (`load_cases` cuts it)."""
    return _resolve(dataset, split, root)[0]


def dataset_path(dataset: str, split: str = "dev", root: str | Path | None = None) -> Path:
    """Path of a benchmark file (same as `resolve_dataset_file`)."""
    return resolve_dataset_file(dataset, split, root)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} is not valid UTF-8 JSON: {exc}"
        raise InvalidRequestError(msg, field="<file>", value=str(path)) from exc


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        msg = f"limit must be a non-negative integer or None, got {limit!r}"
        raise InvalidRequestError(msg, field="limit", value=limit)


def dev_prefix(data: object) -> object:
    """The dev part of a full test file: the first 60% of its records (of each list, for
    Sanitation's object of lists), as ``../shared/knowedit/dev`` was cut."""
    if isinstance(data, list):
        return data[: len(data) * 3 // 5]
    if isinstance(data, Mapping):
        return {k: v[: len(v) * 3 // 5] if isinstance(v, list) else v for k, v in data.items()}
    return data


def _parse(dataset: str, path: Path, *, cut: bool, limit: int | None) -> list[EvalCase]:
    data = _read_json(path)
    return parse_cases(dataset, dev_prefix(data) if cut else data, path, limit=limit)


def load_cases(
    dataset: str,
    *,
    split: str = "dev",
    limit: int | None = None,
    root: str | Path | None = None,
) -> list[EvalCase]:
    """Load `split` of `dataset` as benchmark cases, in file order (the first `limit` records;
    a case does not change with `limit`)."""
    _check_limit(limit)
    path, cut = _resolve(dataset, split, root)
    return _parse(dataset, path, cut=cut, limit=limit)


def load_requests(
    dataset: str,
    *,
    split: str = "dev",
    limit: int | None = None,
    root: str | Path | None = None,
) -> list[EditRequest]:
    """The requests of `load_cases` (first `limit` records), flattened in order."""
    cases = load_cases(dataset, split=split, limit=limit, root=root)
    return [r for case in cases for r in case.requests]


def hub_filename(dataset: str, split: str = "test") -> str:
    """Path of `dataset`'s `split` file in the ``zjunlp/KnowEdit`` dataset repository
    (``split="dev"`` names the test file, which `load_hub_cases` cuts)."""
    _check(dataset, split)
    name = RELEASE_FILES[dataset].get("test" if split == "dev" else split)
    if dataset not in KNOWEDIT_DATASETS or name is None:
        msg = f"{HUB_REPO} has no {split} file of {dataset!r}"
        raise InvalidRequestError(msg, field="dataset", value=dataset)
    return name


def load_hub_cases(
    dataset: str,
    *,
    split: str = "test",
    limit: int | None = None,
    revision: str | None = None,
) -> list[EvalCase]:
    """Download `dataset`'s file from the published ``zjunlp/KnowEdit`` (at `revision`, default
    the main branch) and parse it as `load_cases` does. ``split``: "test" (the whole test file),
    "dev" (its first 60%, as our dev files) or "train" where the release has one."""
    _check_limit(limit)
    filename = hub_filename(dataset, split)
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(
        repo_id=HUB_REPO, repo_type="dataset", filename=filename, revision=revision
    )
    return _parse(dataset, Path(local), cut=split == "dev", limit=limit)


__all__ = [
    "DATASETS",
    "FACT_DATASETS",
    "HUB_REPO",
    "KNOWEDIT_DATASETS",
    "RELEASE_FILES",
    "SPLITS",
    "EvalCase",
    "dataset_path",
    "hub_filename",
    "load_cases",
    "load_hub_cases",
    "load_requests",
    "record_to_request",
    "resolve_dataset_file",
]
