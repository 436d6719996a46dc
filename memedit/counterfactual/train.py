"""Train the counterfactual adapter on KnowEdit *train* files (never the dev records).

Each training example is the `TemplatePath` text with one or more edits in context:

* an in-scope example states the edit (plus 0–``max_distractors`` other edits, in random
  order) and asks its prompt or a paraphrase; the loss is on the new answer's tokens;
* an unrelated example states edits (one of them, with share ``same_subject_share``, about
  the same subject, plus 0–``max_distractors`` others) and asks about something they do not
  answer (another relation of the same subject — the case a scope classifier's false positive
  sends here — or an unrelated question); the labels are the base model's own teacher-forced
  predictions on the bare question, so the adapter learns to leave answers the facts do not
  cover as they were;
* a share of in-scope examples use the chat transcript format instead of the raw one.

Reproduce the shipped adapter with::

    python -m memedit.counterfactual.train --model smollm2-135m --out memedit/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.counterfactual.adapter import (
    METADATA_FORMAT,
    PROMPT_FORMAT,
    base_fingerprint,
    cache_root,
)
from memedit.counterfactual.base import chat_messages, qa_prompt
from memedit.counterfactual.lora import LoraConfig, LowRankAdapter
from memedit.generation import chat_text
from memedit.paths import file_sha256, knowedit_dir
from memedit.types import EditRequest

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "TRAIN_FILES",
    "TrainConfig",
    "TrainFact",
    "build_examples",
    "load_train_facts",
    "train_adapter",
    "train_and_save",
]

log = logging.getLogger(__name__)

#: KnowEdit training files used (relative to the KnowEdit directory).
TRAIN_FILES = (
    "train/ZsRE/zsre_mend_eval_portability_gpt4.not_in_test.json",
    "train/WikiData_counterfact/train_cf.json",
)


def _default_lora() -> LoraConfig:
    return LoraConfig(rank=8, alpha=16.0, layers=None)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all recorded in the adapter's metadata)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    max_distractors: int = 2
    unrelated_share: float = 0.4
    same_subject_share: float = 0.9
    chat_share: float = 0.2
    rephrase_share: float = 0.7
    lora: LoraConfig = field(default_factory=_default_lora)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    def resolved(self, model: PreTrainedModel) -> TrainConfig:
        """This config with ``lora.layers`` None replaced by the model's upper two thirds of
        layers (10–29 of SmolLM2-135M's 30)."""
        if self.lora.layers is not None:
            return self
        n = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        lora = replace(self.lora, layers=tuple(range(n // 3, n)))
        return replace(self, lora=lora)


@dataclass(frozen=True)
class TrainFact:
    """One training edit: its prompt, new answer, paraphrases and unrelated probes."""

    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    probes: tuple[tuple[str, str], ...] = ()
    source: str = ""
    #: True when ``probes`` ask other relations of the edit's own subject (the hard case).
    same_subject: bool = False

    def request(self) -> EditRequest:
        return EditRequest(prompt=self.prompt, target_new=self.target)


def _first(value: Any) -> str:
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else ""


def _zsre_fact(rec: dict[str, Any]) -> TrainFact | None:
    prompt, target = rec.get("src"), rec.get("alt")
    if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
        return None
    rephrases = (rec["rephrase"],) if isinstance(rec.get("rephrase"), str) else ()
    probes: tuple[tuple[str, str], ...] = ()
    loc, ans = rec.get("loc"), rec.get("loc_ans")
    if isinstance(loc, str) and isinstance(ans, str) and ans.strip():
        question = re.sub(r"^nq question:\s*", "", loc).strip()
        if question:
            probes = ((question[0].upper() + question[1:] + "?", ans),)
    return TrainFact(prompt, target, rephrases, probes, "ZsRE")


def _counterfact_fact(rec: dict[str, Any]) -> TrainFact | None:
    prompt, target = rec.get("prompt"), rec.get("target_new")
    if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
        return None
    port = rec.get("portability") or {}
    rephrases = tuple(
        p["prompt"]
        for p in port.get("Subject_Aliasing", []) or []
        if isinstance(p, dict) and _first(p.get("ground_truth")) == target
    )
    probes = tuple(
        (p["prompt"], _first(p.get("ground_truth")))
        for p in (rec.get("locality") or {}).get("Relation_Specificity", []) or []
        if isinstance(p, dict)
        and isinstance(p.get("prompt"), str)
        and _first(p.get("ground_truth"))
    )
    return TrainFact(prompt, target, rephrases, probes, "WikiData_counterfact", True)


def load_train_facts(root: str | Path | None = None) -> tuple[list[TrainFact], dict[str, str]]:
    """The training facts from `TRAIN_FILES` and each file's sha256 (for the metadata)."""
    base = Path(root) if root is not None else knowedit_dir()
    facts: list[TrainFact] = []
    hashes: dict[str, str] = {}
    for rel in TRAIN_FILES:
        path = base / rel
        hashes[rel] = file_sha256(path)
        records = json.loads(path.read_text(encoding="utf-8"))
        convert = _zsre_fact if "ZsRE" in rel else _counterfact_fact
        for rec in records:
            fact = convert(rec) if isinstance(rec, dict) else None
            if fact is not None:
                facts.append(fact)
    return facts, hashes


@dataclass
class Example:
    """Token ids of one example; ``labels`` holds -100 where there is no loss. ``base_query``
    is set for unrelated examples: the bare question whose base predictions become labels."""

    ids: list[int]
    labels: list[int]
    base_query: tuple[str, str] | None = None


def _tok(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _supervised(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> Example:
    prompt_ids = _tok(tokenizer, prompt)
    ids = _tok(tokenizer, prompt + completion)
    n = min(len(prompt_ids), len(ids))
    return Example(ids, [-100] * n + ids[n:])


def build_examples(
    facts: Sequence[TrainFact],
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    count: int,
) -> list[Example]:
    """``count`` training examples drawn with ``config.seed`` (deterministic)."""
    rng = random.Random(config.seed)
    with_probes = [f for f in facts if f.probes]
    same_subject = [f for f in with_probes if f.same_subject]
    groups: dict[str, list[TrainFact]] = {}
    for f in facts:
        groups.setdefault(f.source, []).append(f)
    pools = [groups[k] for k in sorted(groups)]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token or ""
    out: list[Example] = []
    while len(out) < count:
        fact = rng.choice(rng.choice(pools))  # each training file equally often
        others = [rng.choice(facts) for _ in range(rng.randint(0, config.max_distractors))]
        if with_probes and rng.random() < config.unrelated_share:
            if same_subject and rng.random() < config.same_subject_share:
                fact = owner = rng.choice(same_subject)
            else:
                fact = rng.choice(with_probes)
                owner = fact if rng.random() < 0.5 else rng.choice(with_probes)
            question, answer = rng.choice(owner.probes)
            edits = [fact, *others]
            rng.shuffle(edits)
            prompt = qa_prompt(question, [e.request() for e in edits])
            ex = _supervised(tokenizer, prompt, f" {answer}")
            ex.base_query = (question, answer)
            out.append(ex)
            continue
        edits = [fact, *others]
        rng.shuffle(edits)
        requests = [e.request() for e in edits]
        query = fact.prompt
        if fact.rephrases and rng.random() < config.rephrase_share:
            query = rng.choice(fact.rephrases)
        if has_template and rng.random() < config.chat_share:
            msgs = chat_messages([{"role": "user", "content": query}], requests)
            text = chat_text(tokenizer, msgs)
            out.append(_supervised(tokenizer, text, fact.target + eos))
        else:
            out.append(_supervised(tokenizer, qa_prompt(query, requests), f" {fact.target}\n"))
    return out


def _base_labels(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> list[Example]:
    """Fill unrelated examples' labels with the base model's predictions on the bare question
    (dropping the few whose answer tokenizes differently in the two texts)."""
    from memedit.metrics import predicted_tokens

    todo = [e for e in examples if e.base_query is not None]
    if todo:
        preds = predicted_tokens(
            model,
            tokenizer,
            [e.base_query[0] for e in todo if e.base_query],
            [e.base_query[1] for e in todo if e.base_query],
            batch_size=16,
        )
        for ex, pred in zip(todo, preds, strict=True):
            n = sum(1 for x in ex.labels if x != -100)
            if n != len(pred) or n == 0:
                ex.base_query = ("", "")  # mark as unusable
                continue
            ex.labels = ex.labels[: len(ex.labels) - n] + list(pred)
    return [e for e in examples if e.base_query != ("", "")]


def _batch(
    examples: Sequence[Example], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _label_logits(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label, and those labels. Runs the output head
    on those positions only where the model exposes its decoder and head separately."""
    keep = labels[:, 1:] != -100
    decoder = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    head = model.get_output_embeddings()
    if decoder is not None and head is not None and decoder is not model:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return head(hidden[:, :-1][keep]), labels[:, 1:][keep]
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[:, :-1][keep], labels[:, 1:][keep]


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[TrainFact],
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[LowRankAdapter, list[float]]:
    """Train a fresh adapter on ``facts``; return it (frozen) and the loss of every step.

    The base model's weights and ``requires_grad`` flags are unchanged afterwards.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = (config or TrainConfig()).resolved(model)
    device = next(model.parameters()).device
    examples = build_examples(facts, tokenizer, cfg, cfg.steps * cfg.batch_size * 5 // 4 + 32)
    examples = _base_labels(model, tokenizer, examples)[: cfg.steps * cfg.batch_size]
    adapter = LowRankAdapter.for_model(model, cfg.lora, seed=cfg.seed)
    params = adapter.train_mode()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        bar = tqdm(range(cfg.steps), desc="counterfactual adapter", disable=not progress)
        for step in bar:
            chunk = examples[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if not chunk:
                break
            ids, mask, labels = _batch(chunk, int(pad), device)
            with adapter.active(model):
                logits, gold = _label_logits(model, ids, mask, labels)
            loss = F.cross_entropy(logits.float(), gold)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            log.debug("step %d loss %.4f", step, losses[-1])
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
        adapter.freeze()
    return adapter, losses


def _cache_key(fingerprint: dict[str, str], config: TrainConfig, files: dict[str, str]) -> str:
    blob = json.dumps([fingerprint, config.to_dict(), files, PROMPT_FORMAT], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_and_save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    name: str | None = None,
    model_name: str = "",
    catalogue_sha256: str = "",
    progress: bool = True,
) -> Path:
    """Train an adapter for ``model`` and write it with its metadata; return the metadata path.

    Without ``out_dir`` it goes to ``cache_dir()/counterfactual/<key>/adapter.{safetensors,json}``
    (reused when already there); with it, to ``<out_dir>/<name>.{safetensors,json}``.
    """
    cfg = (config or TrainConfig()).resolved(model)
    fingerprint = base_fingerprint(model, cfg.lora)
    facts, files = load_train_facts()
    key = _cache_key(fingerprint, cfg, files)
    if out_dir is None:
        directory, stem = cache_root() / key, "adapter"
        if (directory / f"{stem}.json").is_file():
            return directory / f"{stem}.json"
    else:
        directory, stem = Path(out_dir), name or f"counterfactual-{model_name or key}"
    t0 = time.perf_counter()
    adapter, losses = train_adapter(model, tokenizer, facts, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    directory.mkdir(parents=True, exist_ok=True)
    weights = adapter.save(directory / f"{stem}.safetensors", metadata={"format": "pt"})
    command = "python -m memedit.counterfactual.train"
    command += f" --model {model_name}" if model_name else ""
    command += f" --steps {cfg.steps} --batch-size {cfg.batch_size} --lr {cfg.lr}"
    command += f" --seed {cfg.seed}"
    if out_dir is not None:
        command += f" --out {out_dir}" + (f" --name {name}" if name else "")
    meta = {
        "format": METADATA_FORMAT,
        "name": f"adapter-qa/{model_name or key}",
        "prompt_format": PROMPT_FORMAT,
        "model": model_name,
        "catalogue_sha256": catalogue_sha256,
        "base_tensors": fingerprint,
        "lora": cfg.lora.to_dict(),
        "training": {
            **{k: v for k, v in cfg.to_dict().items() if k != "lora"},
            "files": files,
            "facts": len(facts),
            "first_loss": losses[0] if losses else None,
            "last_losses_mean": sum(losses[-5:]) / max(len(losses[-5:]), 1),
            "seconds": round(seconds, 1),
            "date": date.today().isoformat(),
        },
        "command": command,
        "weights_file": weights.name,
        "weights_sha256": file_sha256(weights),
    }
    meta_path = directory / f"{stem}.json"
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(meta_path)
    log.info("counterfactual adapter trained in %.0f s, written to %s", seconds, meta_path)
    return meta_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memedit.counterfactual.train", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", default="smollm2-135m", help="catalogue name, directory or id")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--out", default=None, help="directory (default: memedit's cache)")
    ap.add_argument("--name", default=None, help="file stem (default: counterfactual-<model>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from memedit.models import load_model
    from memedit.models.catalogue import get_entry, is_catalogued

    model, tok = load_model(args.model)
    catalogue_sha = get_entry(args.model).sha256 if is_catalogued(args.model) else ""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model_name = Path(args.model).name if not is_catalogued(args.model) else args.model
    path = train_and_save(
        model,
        tok,
        config=cfg,
        out_dir=args.out,
        name=args.name,
        model_name=model_name,
        catalogue_sha256=catalogue_sha,
    )
    log.info("%s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
