"""The evaluation loop: pre-edit state once, then per strategy single or sequential editing.

Single mode is the KnowEdit protocol: apply one case's edits, score, revert, next case; the
revert is checked (weights digest bit for bit, and no edit left active). Sequential mode lets
T cases accumulate and scores every case edited so far at each checkpoint (the lifelong curve).

A suite may also have ``before_edit(em, case, opts)``: pre-edit state too large to cache with
`pre` (ConvSent's next-token distributions for its KL), handed to `score` as ``pre["_live"]``.
Single mode takes it right before each case's edit. Sequential mode takes it for every case it
will score before the chain of edits starts, on the same unedited model, and spills it to disk
as it is (see `_LiveSpill`), so every checkpoint compares against the unedited model exactly.

Everything is appended to JSONL as it finishes, so an interrupted run resumes where it stopped:
finished records (single) and finished checkpoints (sequential) are not recomputed; a
sequential chain of edits is kept on disk and continued, not re-applied (`chain.py`), and an
in-weight strategy's optimised values are kept with the run (``values/``, a few KB each,
`memedit.intrinsic.value_cache`), so a chain re-applied where ``work/`` is gone (another
checkout, another machine) skips the optimisation: a value is keyed by the run, the strategy
and the number of cases before it in the chain; its lines then say ``values_reused``
(``edit_s_total`` leaves those values' time out). Records can
be split across worker processes with torch.multiprocessing (one model per process, a GPU each
where present); every worker writes its own file and the report merges them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.datasets import SPLITS, EvalCase, load_cases, resolve_dataset_file
from memedit.errors import InvalidRequestError, MemeditError
from memedit.evaluation.chain import Chain
from memedit.evaluation.strategies import (
    EvalStrategy,
    WrapperStrategy,
    parse_strategy,
    weights_digest,
)
from memedit.evaluation.suites import EvalOptions, suite_for
from memedit.evaluation.unrelated import unrelated_manifest
from memedit.paths import file_sha256

if TYPE_CHECKING:
    from memedit.editable import EditableModel

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "RevertError", "records_path", "run_eval", "safe_name"]

MANIFEST = "manifest.json"
FORMAT = 1
VERIFY_CHOICES = ("all", "sample", "none")


class RevertError(MemeditError):
    """A strategy's revert did not restore the model exactly."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. ``sequential`` = T (None: single mode); ``checkpoints`` = the T's at
    which the sequential curve is scored (default: a log-spaced set ending at T);
    ``edit_batch`` (sequential only): records applied together in each edit of the chain (the
    batched lifelong setting of MEMIT/AlphaEdit; checkpoints are then multiples of it);
    ``sequential_live`` (sequential only): take each scored case's ``before_edit`` state on the
    unedited model before the chain and keep it on disk for the checkpoints (`_LiveSpill`: for
    ConvSent about 100 MB per record on SmolLM2, deleted after the dataset); False skips it,
    and with it the metrics that need it (ConvSent's KL)."""

    datasets: tuple[str, ...]
    strategies: tuple[str, ...] = ("memory",)
    model: str | None = None
    limit: int | None = None
    sequential: int | None = None
    checkpoints: tuple[int, ...] = ()
    edit_batch: int = 1
    out: str = "eval-out"
    seed: int = 0
    workers: int = 1
    root: str | None = None
    split: str = "dev"
    verify_revert: str = "sample"
    sequential_live: bool = True
    options: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        if not self.datasets:
            msg = "give at least one dataset"
            raise InvalidRequestError(msg, field="datasets", value=self.datasets)
        if not self.strategies:
            msg = "give at least one strategy"
            raise InvalidRequestError(msg, field="strategies", value=self.strategies)
        for name, value in (("limit", self.limit), ("sequential", self.sequential)):
            if value is not None and (not isinstance(value, int) or value < 1):
                msg = f"{name} must be a positive integer, got {value!r}"
                raise InvalidRequestError(msg, field=name, value=value)
        if self.split not in SPLITS:
            msg = f"unknown split {self.split!r}; choose one of {list(SPLITS)}"
            raise InvalidRequestError(msg, field="split", value=self.split)
        if not isinstance(self.edit_batch, int) or self.edit_batch < 1:
            msg = f"edit_batch must be a positive integer, got {self.edit_batch!r}"
            raise InvalidRequestError(msg, field="edit_batch", value=self.edit_batch)
        if self.edit_batch > 1 and self.sequential is None:
            msg = f"edit_batch={self.edit_batch} applies to sequential mode; give sequential=T"
            raise InvalidRequestError(msg, field="edit_batch", value=self.edit_batch)
        uneven = [c for c in self.checkpoints if c % self.edit_batch and c != self.sequential]
        if uneven:
            msg = (
                f"checkpoints must be multiples of edit_batch ({self.edit_batch}) or T, "
                f"got {uneven}"
            )
            raise InvalidRequestError(msg, field="checkpoints", value=list(self.checkpoints))
        if not isinstance(self.workers, int) or self.workers < 1:
            msg = f"workers must be a positive integer, got {self.workers!r}"
            raise InvalidRequestError(msg, field="workers", value=self.workers)
        if self.sequential is not None and self.workers > 1:
            msg = "sequential editing is one chain of edits; run it with workers=1"
            raise InvalidRequestError(msg, field="workers", value=self.workers)
        if self.verify_revert not in VERIFY_CHOICES:
            msg = f"verify_revert must be one of {list(VERIFY_CHOICES)}, got {self.verify_revert!r}"
            raise InvalidRequestError(msg, field="verify_revert", value=self.verify_revert)
        bad = [c for c in self.checkpoints if c < 1 or (self.sequential and c > self.sequential)]
        if bad:
            msg = f"checkpoints must lie in 1..sequential ({self.sequential}), got {bad}"
            raise InvalidRequestError(msg, field="checkpoints", value=list(self.checkpoints))
        for spec in self.strategies:
            parse_strategy(spec)

    @property
    def mode(self) -> str:
        return "single" if self.sequential is None else "sequential"

    def curve(self) -> list[int]:
        """The checkpoints of the sequential curve (sorted, ending at T)."""
        if self.sequential is None:
            return []
        t = self.sequential
        points = set(self.checkpoints) if self.checkpoints else {1, 10, 50, 100, 200, 500, 1000}
        if not self.checkpoints and self.edit_batch > 1:  # one point per batch on the default
            points = {c * self.edit_batch for c in points} | {self.edit_batch}
        return sorted({c for c in points if c <= t and c % self.edit_batch == 0} | {t})


def safe_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


def records_path(out: Path, dataset: str, spec: str, mode: str, rank: int = 0) -> Path:
    suffix = f".rank{rank}" if rank else ""
    return out / "records" / dataset / f"{safe_name(spec)}.{mode}{suffix}.jsonl"


def rank_files(directory: Path, stem: str) -> list[Path]:
    """``stem.jsonl`` and every ``stem.rankN.jsonl`` in ``directory``: what all the workers of
    any earlier sitting wrote for one file (a resumed run may use another worker count)."""
    found = [directory / f"{stem}.jsonl", *sorted(directory.glob(f"{stem}.rank*.jsonl"))]
    return [p for p in found if p.is_file()]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "memedit",
        "torch",
        "transformers",
        "faiss-cpu",
        "onnxruntime",
        "sentence-transformers",
        "numpy",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Lines of a JSONL file; a torn last line (the run was killed mid-write) is skipped."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", path)
                continue
            if isinstance(item, dict):
                yield item


def _repair(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so appended lines start on their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("dropping a torn last line of %s (%d bytes)", path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)


def _append(path: Path, item: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(item, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _manifest(config: EvalConfig, em: EditableModel, digest: str) -> dict[str, Any]:
    unrelated = config.options.unrelated
    strategies = {spec: parse_strategy(spec) for spec in config.strategies}
    settings = {}
    for spec, strategy in strategies.items():
        resolve = getattr(strategy, "settings", None)
        found = resolve(em) if resolve is not None else None
        if found is not None:
            settings[spec] = found
    datasets = {}
    for ds in config.datasets:
        path = resolve_dataset_file(ds, config.split, config.root)
        datasets[ds] = {"file": str(path), "sha256": file_sha256(path)}
        if config.split != "dev":  # dev runs keep the manifests (and run ids) they had
            datasets[ds]["split"] = config.split
    return {
        "format": FORMAT,
        "model": em.model_name,
        "model_digest": digest,
        "scope": getattr(em.scope, "name", ""),
        "counterfactual": getattr(em.counterfactual, "name", None),
        "datasets": datasets,
        "strategies": {spec: strategy.config() for spec, strategy in strategies.items()},
        # every setting each edit will use, defaults filled in (absent: none resolvable here)
        **({"settings": settings} if settings else {}),
        "mode": config.mode,
        "sequential": config.sequential,
        **({"edit_batch": config.edit_batch} if config.edit_batch > 1 else {}),
        "limit": config.limit,
        "seed": config.seed,
        "options": config.options.to_dict(),
        # where --unrelated's probes come from (absent when off: earlier manifests hold)
        **({"unrelated": unrelated_manifest(unrelated)} if unrelated is not None else {}),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


_MUST_MATCH = ("model_digest", "mode", "sequential", "seed", "options")


def _run_id(manifest: dict[str, Any]) -> str:
    """Short fingerprint of what determines a record's numbers (model weights, mode, seed,
    options, dataset hashes, strategy configs): every record line carries it, so a line can be
    traced to its manifest."""
    import hashlib

    key = {k: manifest.get(k) for k in (*_MUST_MATCH, "datasets", "strategies")}
    if manifest.get("edit_batch", 1) != 1:  # absent from runs that edit one record at a time
        key["edit_batch"] = manifest["edit_batch"]
    if "unrelated" in manifest:  # absent from runs without unrelated probes
        key["unrelated"] = {k: manifest["unrelated"][k] for k in ("source", "sha256")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _reconcile(out: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest, or check a resumed run's one against it (new datasets and
    strategies may be added; anything that changes the numbers must match)."""
    path = out / MANIFEST
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fresh, indent=2), encoding="utf-8")
        return fresh
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in _MUST_MATCH:
        if old.get(key) != fresh.get(key):
            msg = (
                f"{out} holds a run with a different {key} ({old.get(key)!r} vs "
                f"{fresh.get(key)!r}); resume only the same run, or choose a new --out"
            )
            raise InvalidRequestError(msg, field=key, value=fresh.get(key))
    if old.get("edit_batch", 1) != fresh.get("edit_batch", 1):
        msg = (
            f"{out} holds a run with edit_batch {old.get('edit_batch', 1)} (this one: "
            f"{fresh.get('edit_batch', 1)}); resume only the same run, or choose a new --out"
        )
        raise InvalidRequestError(msg, field="edit_batch", value=fresh.get("edit_batch", 1))
    had_u, now_u = old.get("unrelated"), fresh.get("unrelated")
    if had_u is not None and now_u is not None and had_u["sha256"] != now_u["sha256"]:
        msg = f"{out}: the unrelated probes' file changed since the run began ({now_u['file']})"
        raise InvalidRequestError(msg, field="unrelated", value=now_u["file"])
    for ds, info in fresh["datasets"].items():
        had = old["datasets"].get(ds)
        if had is not None and had["sha256"] != info["sha256"]:
            msg = f"{out}: dataset {ds} changed since the run began ({info['file']})"
            raise InvalidRequestError(msg, field="datasets", value=ds)
    _reconcile_settings(out, old, fresh)
    old["datasets"].update(fresh["datasets"])
    old["strategies"].update(fresh["strategies"])
    if old.get("limit") is not None:  # a resumed run may ask for more records (None: all)
        new_limit = fresh.get("limit")
        old["limit"] = None if new_limit is None else max(old["limit"], new_limit)
    old["versions"] = fresh["versions"]
    path.write_text(json.dumps(old, indent=2), encoding="utf-8")
    return dict(old)


def _reconcile_settings(out: Path, old: dict[str, Any], fresh: dict[str, Any]) -> None:
    """Refuse to resume a strategy whose resolved settings changed since its records were made
    (a default moved: its old records would be mixed with new ones under one name). Only
    settings both sides name are compared, so a new field with a default leaves a run
    resumable. A strategy the run already had before manifests kept settings gets none: what
    it was run with is not known."""
    kept = dict(old.get("settings", {}))
    for spec, now in fresh.get("settings", {}).items():
        had = kept.get(spec)
        if had is None:
            if spec not in old["strategies"]:
                kept[spec] = now
            continue
        changed = sorted(k for k in had.keys() & now.keys() if had[k] != now[k])
        if changed:
            diff = ", ".join(f"{k} {had[k]!r} -> {now[k]!r}" for k in changed)
            msg = (
                f"{out} holds records of {spec} made with other settings than it has now "
                f"({diff}): a default changed since the run began; choose a new --out"
            )
            raise InvalidRequestError(msg, field="strategies", value=spec)
        kept[spec] = {**had, **now}
    if kept:
        old["settings"] = kept


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="rec",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _pre_states(
    em: EditableModel,
    dataset: str,
    cases: Sequence[EvalCase],
    config: EvalConfig,
    out: Path,
    rank: int,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Pre-edit state of every case, computed once (before any edit) and cached on disk."""
    suite = suite_for(dataset)
    path = out / "pre" / f"{dataset}{f'.rank{rank}' if rank else ''}.jsonl"
    _repair(path)
    # every rank's cache: an earlier sitting with another worker count split the cases otherwise
    cached = {
        int(item["index"]): item["pre"]
        for other in rank_files(out / "pre", dataset)
        for item in _read_jsonl(other)
    }
    todo = [c for c in cases if c.index not in cached]
    bar = _progress(len(cases), f"{dataset} pre-edit", progress, len(cases) - len(todo))
    for case in todo:
        state = suite.pre(em, case, config.options)
        _append(path, {"index": case.index, "pre": state})
        cached[case.index] = state
        bar.update(1)
    bar.close()
    return cached


class _LiveSpill:
    """Sequential mode's ``before_edit`` states: taken on the unedited model before the chain of
    edits starts (the same model single mode takes them on), written to disk with `torch.save`
    exactly as the suite returned them (ConvSent's float32 distributions stay float32, so the KL
    at every checkpoint is the exact one), one file per case, read back one case at a time when
    it is scored. The directory is emptied when opened and removed by `close`.

    Cost: a disk file per scored case of the state's size (ConvSent on SmolLM2: vocabulary
    49,152 x ~500 positions x 4 bytes, ~100 MB per record, ~10 GB for T = 100) and one forward
    pass per case, as in single mode; RAM holds one case at a time. A state of None (the suite
    has nothing live to give, e.g. a black-box wrapper) is not written and reads back as None.
    """

    def __init__(self, directory: Path, before_edit: Any) -> None:
        import shutil

        self.dir, self.before_edit = directory, before_edit
        shutil.rmtree(self.dir, ignore_errors=True)  # a killed run's leftovers
        self.taken: set[int] = set()

    def _file(self, index: int) -> Path:
        return self.dir / f"{index}.pt"

    def take(
        self, em: EditableModel, cases: Sequence[EvalCase], opts: EvalOptions, desc: str, bar: bool
    ) -> None:
        """Take the state of each case not yet taken; call only while em is unedited."""
        import torch

        todo = [c for c in cases if c.index not in self.taken]
        if not todo:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        progress = _progress(len(todo), desc, bar)
        for case in todo:
            state = self.before_edit(em, case, opts)
            if state is not None:
                tmp = self._file(case.index).with_suffix(".tmp")
                torch.save(state, tmp)
                tmp.replace(self._file(case.index))
            self.taken.add(case.index)
            progress.update(1)
        progress.close()

    def get(self, index: int) -> Any:
        import torch

        path = self._file(index)
        if index not in self.taken or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)  # written by this run

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        self.taken.clear()
        with contextlib.suppress(OSError):  # the shared live/ folder, once no dataset uses it
            self.dir.parent.rmdir()


class _Verifier:
    def __init__(self, em: EditableModel, policy: str) -> None:
        self.em, self.policy = em, policy
        self.digest = weights_digest(em.model) if em.model is not None else ""
        self.active = {r.id for r in em.edits()}
        self.checked = 0

    def due(self, n: int) -> bool:
        if self.policy == "all":
            return True
        return self.policy == "sample" and (n < 3 or n % 25 == 0)

    def check(self, what: str) -> None:
        left = {r.id for r in self.em.edits()} - self.active
        if left:
            msg = f"{what}: edits {sorted(left)} are still active after the revert"
            raise RevertError(msg)
        if self.em.model is not None and weights_digest(self.em.model) != self.digest:
            msg = f"{what}: the model's weights differ from before the edit after its revert"
            raise RevertError(msg)
        self.checked += 1


def _score_line(
    em: EditableModel,
    dataset: str,
    case: EvalCase,
    pre: dict[str, Any],
    options: EvalOptions,
    base: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed * 1_000_003 + case.index)  # sampled Fluency: same draw on resume
    t0 = time.perf_counter()
    metrics = suite_for(dataset).score(em, case, pre, options)
    return {
        **base,
        "index": case.index,
        "metrics": metrics,
        "eval_s": round(time.perf_counter() - t0, 4),
    }


def _run_single(
    em: EditableModel,
    dataset: str,
    strategy: EvalStrategy,
    spec: str,
    cases: Sequence[EvalCase],
    pre: dict[int, dict[str, Any]],
    config: EvalConfig,
    out: Path,
    rank: int,
    progress: bool,
    run: str,
) -> None:
    path = records_path(out, dataset, spec, "single", rank)
    _repair(path)
    # done by any rank of any sitting: resuming with another --workers must not redo a record
    stem = records_path(out, dataset, spec, "single").stem
    done = {
        int(item["index"]) for other in rank_files(path.parent, stem) for item in _read_jsonl(other)
    }
    todo = [c for c in cases if c.index not in done]
    verifier = _Verifier(em, config.verify_revert)
    before_edit = getattr(suite_for(dataset), "before_edit", None)
    bar = _progress(len(cases), f"{dataset} {spec}", progress, len(cases) - len(todo))
    for n, case in enumerate(todo):
        base = {"dataset": dataset, "strategy": spec, "mode": "single", "run": run}
        state = pre[case.index]
        if before_edit is not None:  # state too large to cache, taken right before the edit
            state = {**state, "_live": before_edit(em, case, config.options)}
        t0 = time.perf_counter()
        try:
            applied = strategy.apply(em, case.requests)
        except MemeditError as exc:  # the edit was refused as a whole: record why, go on
            _append(path, {**base, "index": case.index, "error": str(exc)})
            bar.update(1)
            continue
        edit_s = time.perf_counter() - t0
        try:
            line = _score_line(em, dataset, case, state, config.options, base, config.seed)
        finally:
            applied.revert()
        if verifier.due(n):
            verifier.check(f"{spec} on {dataset} record {case.index}")
        line["edit_s"] = round(edit_s, 4)
        _append(path, line)
        bar.update(1)
    bar.close()


def _run_sequential(
    em: EditableModel,
    dataset: str,
    strategy: EvalStrategy,
    spec: str,
    cases: Sequence[EvalCase],
    pre: dict[int, dict[str, Any]],
    config: EvalConfig,
    out: Path,
    progress: bool,
    run: str,
    live: _LiveSpill | None = None,
    *,
    chain_run: str | None = None,
) -> None:
    path = records_path(out, dataset, spec, "sequential")
    _repair(path)
    done: dict[int, set[int]] = {}
    for item in _read_jsonl(path):
        done.setdefault(int(item["T"]), set()).add(int(item["index"]))
    curve = [t for t in config.curve() if t <= len(cases)]
    verifier = _Verifier(em, config.verify_revert)
    if live is not None:  # before the first edit: the reference is the unedited model
        todo = {c.index for t in curve for c in cases[:t] if c.index not in done.get(t, set())}
        desc = f"{dataset} pre-edit (live)"
        live.take(em, [c for c in cases if c.index in todo], config.options, desc, progress)
    applied = []
    edit_s = 0.0
    step = config.edit_batch
    starts = list(range(0, curve[-1], step))
    groups = [cases[s : min(s + step, curve[-1])] for s in starts]
    chain = None
    target = em
    if isinstance(strategy, WrapperStrategy):  # its chain is kept on disk (see chain.py)
        chain = Chain.open(out / "work" / "chain" / safe_name(dataset) / safe_name(spec), em)
        target = chain.em
    bar = _progress(len(curve), f"{dataset} {spec} sequential (checkpoints)", progress)
    # optimised values kept with the run: a later sitting re-applying the chain (on another
    # checkout, without work/) reads them back instead of optimising (keyed per chain step)
    values = contextlib.ExitStack()
    cache = None
    if isinstance(strategy, WrapperStrategy) and strategy.strategy == "weights":
        from memedit.intrinsic.value_cache import value_cache

        where = out / "values" / safe_name(dataset) / safe_name(spec)
        cache = values.enter_context(value_cache(where))
    try:
        if chain is not None:
            chain.check([[c.index for c in g] for g in groups])
            edit_s = chain.edit_s
            if chain.batches:
                log.info(
                    "%s on %s: continuing a kept chain of %d cases", spec, dataset, chain.cases
                )
            bar.update(sum(1 for t in curve if t <= chain.cases))
        for start, group in zip(starts, groups, strict=True):
            t = start + len(group)
            if chain is not None and t <= chain.cases:
                continue
            if cache is not None:  # the chain's state before this batch (see value_cache.py)
                cache.context = f"run {chain_run or run} | {dataset} | {spec} | after {start} cases"
            t0 = time.perf_counter()
            now = strategy.apply(target, [r for c in group for r in c.requests])
            edit_s += time.perf_counter() - t0
            if chain is None:
                applied.append(now)
            if t not in curve:
                if chain is not None:
                    chain.record([c.index for c in group], _edit_ids(now), edit_s)
                continue
            base = {
                "run": run,
                "dataset": dataset,
                "strategy": spec,
                "mode": "sequential",
                "T": t,
                "edit_batch": step,
                "edit_s_total": round(edit_s, 4),
            }
            if cache is not None and cache.hits:  # edit_s_total then leaves their time out
                base["values_reused"] = cache.hits
            for c in cases[:t]:
                if c.index in done.get(t, set()):
                    continue
                state = pre[c.index]
                if live is not None and (taken := live.get(c.index)) is not None:
                    state = {**state, "_live": taken}
                line = _score_line(target, dataset, c, state, config.options, base, config.seed)
                _append(path, line)
            if chain is not None:  # scored: a later sitting continues after this batch
                chain.record([c.index for c in group], _edit_ids(now), edit_s)
            bar.update(1)
    finally:
        values.close()
        if chain is not None:
            chain.close()
        for a in reversed(applied):
            a.revert()
        bar.close()
    if config.verify_revert != "none":
        verifier.check(f"{spec} on {dataset} after {len(applied)} sequential edits")


def _edit_ids(applied: Any) -> list[int]:
    """The edit ids a wrapper strategy's edit got (`strategies._WrapperApplied.ids`)."""
    return [int(i) for i in applied.ids]


def evaluate(
    em: EditableModel,
    config: EvalConfig,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> Path:
    """Run `config` on an already loaded wrapper (rank/world: this worker's share of records).
    Returns the output directory."""
    import torch

    out = Path(config.out)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    digest = weights_digest(em.model) if em.model is not None else ""
    if em.edits():
        msg = "evaluate an EditableModel with no active edits (its memory must start empty)"
        raise InvalidRequestError(msg, field="em", value=len(em.edits()))
    manifest = _manifest(config, em, digest)
    if rank == 0:
        _reconcile(out, manifest)
    run = _run_id(manifest)
    for dataset in config.datasets:
        cases = load_cases(dataset, split=config.split, limit=config.limit, root=config.root)
        mine = [c for i, c in enumerate(cases) if i % world == rank]
        pre = _pre_states(em, dataset, mine, config, out, rank, progress)
        before_edit = getattr(suite_for(dataset), "before_edit", None)
        live = None
        if config.sequential is not None and config.sequential_live and before_edit is not None:
            live = _LiveSpill(out / "work" / "live" / safe_name(dataset), before_edit)
        try:
            for spec in config.strategies:
                strategy = parse_strategy(spec)
                if config.sequential is None:
                    _run_single(
                        em, dataset, strategy, spec, mine, pre, config, out, rank, progress, run
                    )
                else:
                    # what the chain's states depend on: this dataset and strategy alone (the
                    # same whichever others the command names; for a command of one dataset
                    # and one strategy it is the run id itself)
                    alone = {
                        **manifest,
                        "datasets": {dataset: manifest["datasets"][dataset]},
                        "strategies": {spec: manifest["strategies"][spec]},
                    }
                    chain_run = _run_id(alone)
                    _run_sequential(
                        em,
                        dataset,
                        strategy,
                        spec,
                        mine,
                        pre,
                        config,
                        out,
                        progress,
                        run,
                        live,
                        chain_run=chain_run,
                    )
        finally:
            if live is not None:
                live.close()
    return out


def _worker(rank: int, config_json: str, world: int, progress: bool) -> None:
    config = config_from_dict(json.loads(config_json))
    device = None
    import torch

    if world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if torch.cuda.is_available():
        device = f"cuda:{rank % torch.cuda.device_count()}"
    from memedit.editable import EditableModel

    memory = Path(config.out) / "work" / f"memory-rank{rank}-pid{os.getpid()}"
    import shutil

    shutil.rmtree(memory, ignore_errors=True)
    em = EditableModel.load(config.model, memory=memory, device=device, progress=False)
    try:
        evaluate(em, config, rank=rank, world=world, progress=progress and rank == 0)
    finally:
        em.close()
        shutil.rmtree(memory, ignore_errors=True)  # scratch: every record was rolled back


def config_to_dict(config: EvalConfig) -> dict[str, Any]:
    d = asdict(config)
    d["options"] = config.options.to_dict()
    return d


def config_from_dict(d: dict[str, Any]) -> EvalConfig:
    d = dict(d)
    d["options"] = EvalOptions(**d.get("options", {}))
    for key in ("datasets", "strategies", "checkpoints"):
        d[key] = tuple(d.get(key, ()))
    return EvalConfig(**d)


def run_eval(config: EvalConfig, *, progress: bool = True) -> Path:
    """Load the model and run `config`, in `config.workers` processes when more than one.
    Returns the output directory (records, pre-edit cache, manifest; see `report`)."""
    if config.workers == 1:
        _worker(0, json.dumps(config_to_dict(config)), 1, progress)
        return Path(config.out)
    import torch.multiprocessing as mp

    # rank 0 writes the manifest first so the workers agree on one run
    mp.spawn(
        _worker,
        args=(json.dumps(config_to_dict(config)), config.workers, progress),
        nprocs=config.workers,
        join=True,
    )
    return Path(config.out)
