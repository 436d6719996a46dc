"""Train the scope head: ``python -m memedit.scope.train [--out PATH] [--knowedit DIR]``.

Builds labelled pairs from the KnowEdit train files (`memedit.scope.data`), computes their
features with the frozen MiniLM (`memedit.scope.features`), fits the MLP head with torch,
and sets its threshold on out-of-fold scores of *train* records (never dev) so that recall on
held-out edit prompts and their real rephrasings is at least ``--target-recall``. The output
JSON records the base encoder's sha256, every training file's sha256, the arguments and the
out-of-fold figures.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memedit.paths import file_sha256
from memedit.scope.classifier import DEFAULT_HEAD, is_question
from memedit.scope.data import TRAIN_FILES, Pair, build_pairs, load_train_records
from memedit.scope.encoder import (
    BASE_ENCODER,
    BASE_PACKAGE,
    TokenEncoder,
    base_encoder_fingerprint,
)
from memedit.scope.features import SCALAR_FEATURES, EditSide, edit_side, pair_features
from memedit.scope.head import ScopeHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 32
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    folds: int = 5
    target_recall: float = 0.97
    #: Recall kept on held-out question-form positives (ZsRE rephrasings and edit prompts) by
    #: the head's ``question_threshold``; 0 leaves question-form edits on `target_recall`.
    #: 0.96, not the floor's 0.95: calibrated at exactly 0.95 (threshold 0.83) the first 200
    #: ZsRE dev records kept only 0.940, so the floor needs a margin for sampling.
    question_target_recall: float = 0.96
    rephrase_weight: float = 8.0
    seed: int = 0
    counterfact_limit: int = 3000


#: Pair kinds that are real (not template) rephrasings; they carry `rephrase_weight`.
REPHRASE_KINDS = ("rephrase", "rephrase_reverse")


def featurize(pairs: Sequence[Pair], encoder: TokenEncoder, *, batch_size: int = 128) -> np.ndarray:
    """Feature matrix of `pairs` (each distinct text is encoded once)."""
    texts = list(dict.fromkeys([p.query for p in pairs] + [p.edit for p in pairs]))
    saved = encoder.cache_size
    encoder.cache_size = 0  # do not let a training run fill the inference cache
    try:
        encoded = dict(zip(texts, encoder.encode(texts, batch_size=batch_size), strict=True))
    finally:
        encoder.cache_size = saved
    sides: dict[tuple[str, str], EditSide] = {}
    rows = []
    for p in pairs:
        key = (p.edit, p.subject)
        side = sides.get(key)
        if side is None:
            side = sides[key] = edit_side(encoded[p.edit], p.subject)
        rows.append(pair_features(encoded[p.query], side))
    return np.stack(rows).astype(np.float32)


def fit_head(
    x: np.ndarray, y: np.ndarray, config: TrainConfig, weight: np.ndarray | None = None
) -> ScopeHead:
    """Fit standardise → MLP → sigmoid on (x, y) with class-balanced, weighted BCE."""
    import torch

    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-4
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y.astype(np.float32))
    net = torch.nn.Sequential(
        torch.nn.Dropout(config.dropout),
        torch.nn.Linear(x.shape[1], config.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(config.hidden, 1),
    )
    w = np.ones(len(y), dtype=np.float64) if weight is None else weight.astype(np.float64)
    for label in (0.0, 1.0):  # each class carries half of the total weight
        sel = y == label
        if sel.any():
            w[sel] *= 0.5 * len(y) / w[sel].sum()
    wt = torch.from_numpy(w.astype(np.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, (len(yt) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    net.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(yt), generator=g)
        total = 0.0
        for i in range(0, len(yt), config.batch_size):
            idx = order[i : i + config.batch_size]
            opt.zero_grad()
            logits = net(xt[idx]).squeeze(-1)
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, yt[idx], reduction="none"
            )
            loss = (losses * wt[idx]).mean()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.debug("epoch %d loss %.4f", epoch, total / len(yt))
    net.eval()
    lin1, lin2 = net[1], net[3]
    assert isinstance(lin1, torch.nn.Linear) and isinstance(lin2, torch.nn.Linear)
    return ScopeHead(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        w1=lin1.weight.detach().numpy().T.copy(),
        b1=lin1.bias.detach().numpy().copy(),
        w2=lin2.weight.detach().numpy()[0].copy(),
        b2=lin2.bias.detach().numpy().copy(),
    )


def calibration_positives(pairs: Sequence[Pair]) -> np.ndarray:
    """Mask of the pairs the threshold is calibrated on, mirroring the dev floor ("edit
    prompts and rephrasings"): every real rephrasing scored against its edit, and the edit
    prompt itself of each record that has one."""
    with_rephrase = {p.group for p in pairs if p.kind == "rephrase"}
    return np.array(
        [
            p.kind == "rephrase"
            or (p.kind == "self" and p.query == p.edit and p.group in with_rephrase)
            for p in pairs
        ]
    )


def calibrate(scores: np.ndarray, positives: np.ndarray, target_recall: float) -> float:
    """Highest threshold keeping recall ≥ `target_recall` on the `positives` mask."""
    pos = np.sort(scores[positives])
    if pos.size == 0:
        return 0.5
    k = int(np.floor((1.0 - target_recall) * pos.size))
    return float(np.clip(pos[k] - 1e-6, 0.0, 1.0))


def out_of_fold(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, pairs: Sequence[Pair], config: TrainConfig
) -> np.ndarray:
    """Scores of every pair from a head trained without its record (k folds by record)."""
    groups = sorted({p.group for p in pairs})
    random.Random(config.seed).shuffle(groups)
    fold_of = {g: i % config.folds for i, g in enumerate(groups)}
    fold = np.array([fold_of[p.group] for p in pairs])
    scores = np.zeros(len(pairs), dtype=np.float32)
    for k in range(config.folds):
        held = fold == k
        if held.any() and (~held).any():
            head = fit_head(x[~held], y[~held], config, w[~held])
            scores[held] = head.predict(x[held])
    return scores


def rates(scores: np.ndarray, pairs: Sequence[Pair], threshold: float) -> dict[str, float]:
    """Share of pairs scored in scope, per pair kind (recall for positives, FPR otherwise)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(scores, pairs, strict=True):
        hits[f"{'pos' if p.label else 'neg'}:{p.kind}"].append(bool(s >= threshold))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}


def train(
    knowedit: Path,
    config: TrainConfig,
    *,
    encoder: TokenEncoder | None = None,
    record_limit: int | None = None,
) -> tuple[ScopeHead, dict[str, Any]]:
    """Build pairs, featurize, calibrate the threshold on out-of-fold scores (folds split by
    record), then fit the head on every pair with the same settings."""
    enc = encoder if encoder is not None else TokenEncoder()
    records = load_train_records(knowedit, limit=record_limit)
    if "CounterFact" in records:
        records["CounterFact"] = records["CounterFact"][: config.counterfact_limit]
    pairs = build_pairs(records, seed=config.seed)
    log.info("%d pairs from %d records; featurizing", len(pairs), len({p.group for p in pairs}))
    x = featurize(pairs, enc)
    y = np.array([p.label for p in pairs], dtype=np.float32)
    w = np.array([config.rephrase_weight if p.kind in REPHRASE_KINDS else 1.0 for p in pairs])
    oof = out_of_fold(x, y, w, pairs, config)
    positives = calibration_positives(pairs)
    threshold = calibrate(oof, positives, config.target_recall)
    report: dict[str, Any] = {"threshold": threshold, "out_of_fold": rates(oof, pairs, threshold)}
    log.info("out-of-fold threshold %.4f: %s", threshold, report["out_of_fold"])
    question_threshold: float | None = None
    question_pos = positives & np.array([is_question(p.edit) for p in pairs])
    if config.question_target_recall > 0 and question_pos.any():
        question_threshold = calibrate(oof, question_pos, config.question_target_recall)
        question = np.array([is_question(p.edit) for p in pairs])
        report["question_threshold"] = question_threshold
        asked = [p for p, q in zip(pairs, question, strict=True) if q]
        report["out_of_fold_question_edits"] = rates(oof[question], asked, question_threshold)
        log.info(
            "out-of-fold question-form threshold %.4f: %s",
            question_threshold,
            report["out_of_fold_question_edits"],
        )
    final = fit_head(x, y, config, w)
    final.threshold = threshold
    final.question_threshold = question_threshold
    files = {
        f"train/{TRAIN_FILES[ds]}": file_sha256(Path(knowedit) / "train" / TRAIN_FILES[ds])
        for ds in records
    }
    final.meta = {
        "base_encoder": BASE_ENCODER,
        "base_encoder_package": BASE_PACKAGE,
        "base_encoder_sha256": base_encoder_fingerprint(enc.path),
        "features": [*SCALAR_FEATURES, "u*v[384]", "|u-v|[384]"],
        "training_files_sha256": files,
        "config": asdict(config),
        "record_limit": record_limit,
        "n_pairs": len(pairs),
        "calibration": report,
        "command": " ".join(["python -m memedit.scope.train", *_cli_args(config)]),
    }
    return final, report


def _cli_args(config: TrainConfig) -> list[str]:
    defaults = TrainConfig()
    return [
        f"--{k.replace('_', '-')} {v}"
        for k, v in asdict(config).items()
        if v != getattr(defaults, k)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from memedit.paths import knowedit_dir

    parser = argparse.ArgumentParser(prog="python -m memedit.scope.train", description=__doc__)
    parser.add_argument("--knowedit", type=Path, default=None, help="KnowEdit data directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_HEAD, help="head JSON to write")
    for f, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    head, _ = train(args.knowedit or knowedit_dir(), config)
    path = head.save(args.out)
    log.info("wrote %s (threshold %.4f)", path, head.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
