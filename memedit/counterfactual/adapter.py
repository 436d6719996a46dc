"""`AdapterPath`: the edits in context plus a small trained low-rank adapter, and how the
default path for a model is chosen.

An adapter is a float16 safetensors file and a JSON metadata file beside it. The metadata
names the base model it was trained on by the sha256 of a few of its weight tensors; an
adapter is used only on a model whose tensors hash the same. Shipped adapters live in
``memedit/data/counterfactual-*.json``; adapters trained here (``python -m
memedit.counterfactual.train``, or on first use with ``train=True``) under
``cache_dir()/counterfactual/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.counterfactual.base import CounterfactualPath, TemplatePath
from memedit.counterfactual.lora import LoraConfig, LowRankAdapter, target_modules
from memedit.errors import IntegrityError, ModulePathError
from memedit.paths import cache_dir, file_sha256

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = [
    "PROMPT_FORMAT",
    "AdapterPath",
    "base_fingerprint",
    "default_counterfactual_path",
    "find_adapter",
    "load_adapter_path",
    "metadata_matches",
]

log = logging.getLogger(__name__)

#: Version of the input text the adapters are trained on (`base.qa_prompt`, `chat_messages`).
PROMPT_FORMAT = "qa-v1"
METADATA_FORMAT = 1
#: Set to 1 to train an adapter on first use when none matches the model (minutes on a CPU).
TRAIN_ENV = "MEMEDIT_COUNTERFACTUAL_TRAIN"


def _fingerprint_names(model: nn.Module, config: LoraConfig) -> list[str]:
    names = target_modules(model, config)
    picked = [f"{names[0]}.weight", f"{names[-1]}.weight"]
    params = dict(model.named_parameters())
    if "model.norm.weight" in params:
        picked.append("model.norm.weight")
    return picked


def base_fingerprint(model: nn.Module, config: LoraConfig) -> dict[str, str]:
    """sha256 of a few named base tensors (as float32 bytes) that identify the base model.

    Raises `ModulePathError` when the model lacks the config's target modules.
    """
    import torch

    params = dict(model.named_parameters())
    out = {}
    for name in _fingerprint_names(model, config):
        data = params[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def metadata_matches(model: nn.Module, meta: Mapping[str, Any]) -> bool:
    """True when ``meta`` (an adapter's metadata) was trained on this very base model."""
    if meta.get("format") != METADATA_FORMAT or meta.get("prompt_format") != PROMPT_FORMAT:
        return False
    try:
        config = LoraConfig.from_dict(dict(meta["lora"]))
        expected = dict(meta["base_tensors"])
        params = dict(model.named_parameters())
        if any(name not in params for name in expected):
            return False
        return base_fingerprint(model, config) == expected
    except (KeyError, TypeError, ValueError, ModulePathError):
        return False


class AdapterPath(TemplatePath):
    """The edits in context (the `TemplatePath` text) with a trained low-rank adapter active."""

    def __init__(self, adapter: LowRankAdapter, *, name: str = "adapter-qa") -> None:
        self.adapter = adapter
        self.name = name

    def activate(self, model: Any) -> AbstractContextManager[Any]:
        return self.adapter.active(model)

    def __repr__(self) -> str:
        return f"AdapterPath(name={self.name!r}, modules={len(self.adapter.names)})"


def load_adapter_path(meta_path: str | Path) -> AdapterPath:
    """Load the adapter described by a metadata JSON file (weights file beside it, its
    sha256 checked)."""
    meta_file = Path(meta_path)
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    weights = meta_file.with_name(str(meta["weights_file"]))
    digest = file_sha256(weights)
    if digest != meta["weights_sha256"]:
        msg = f"{weights} has sha256 {digest}; its metadata {meta_file} expects "
        msg += str(meta["weights_sha256"])
        raise IntegrityError(msg)
    config = LoraConfig.from_dict(dict(meta["lora"]))
    adapter = LowRankAdapter.load(weights, config)
    return AdapterPath(adapter, name=str(meta.get("name", "adapter-qa")))


def _shipped() -> Iterator[Path]:
    data = resources.files("memedit") / "data"
    if not data.is_dir():
        return
    for entry in sorted(data.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("counterfactual-") and entry.name.endswith(".json"):
            yield Path(str(entry))


def cache_root() -> Path:
    return cache_dir() / "counterfactual"


def _cached() -> Iterator[Path]:
    root = cache_root()
    if root.is_dir():
        yield from sorted(root.glob("*/adapter.json"))


def find_adapter(model: nn.Module, candidates: Iterable[Path] | None = None) -> Path | None:
    """The metadata file of an adapter trained on ``model`` (shipped first, then cached)."""
    paths = candidates if candidates is not None else [*_shipped(), *_cached()]
    for path in paths:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("ignoring unreadable counterfactual adapter metadata %s", path)
            continue
        if metadata_matches(model, meta):
            return path
    return None


def default_counterfactual_path(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    progress: bool = True,
    train: bool | None = None,
) -> CounterfactualPath:
    """The measured-best path for ``model``: its trained adapter (shipped or cached) when one
    matches the base weights; otherwise, with ``train`` (default: ``$MEMEDIT_COUNTERFACTUAL_TRAIN
    == "1"``), train one now and cache it; otherwise `TemplatePath`, with a warning."""
    found = find_adapter(model)
    if found is not None:
        try:
            path = load_adapter_path(found)
        except (OSError, ValueError, KeyError, IntegrityError) as exc:
            log.warning("counterfactual adapter %s could not be loaded (%s)", found, exc)
        else:
            log.info("counterfactual path: adapter %s", found)
            return path
    if train is None:
        train = os.environ.get(TRAIN_ENV, "") == "1"
    if train:
        from memedit.counterfactual.train import train_and_save

        try:
            meta_path = train_and_save(model, tokenizer, progress=progress)
        except ModulePathError as exc:
            log.warning("cannot train a counterfactual adapter for this model: %s", exc)
        else:
            return load_adapter_path(meta_path)
    log.warning(
        "no trained counterfactual adapter matches this model; using the in-context template "
        "only (lower edit success). Train one with `python -m memedit.counterfactual.train "
        "--model <name>` or set %s=1.",
        TRAIN_ENV,
    )
    return TemplatePath()
