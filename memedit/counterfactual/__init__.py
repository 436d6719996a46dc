"""The counterfactual path: how an in-scope query is answered with its edits.

`TemplatePath` states the edits in context (IKE-style question/answer pairs; no training, any
model). `AdapterPath` uses the same text with a small low-rank adapter trained on the KnowEdit
train files active only while the query runs. `default_counterfactual_path` picks the
adapter trained for the given base model (shipped as package data or cached) and falls back
to the template.
"""

from __future__ import annotations

from memedit.counterfactual.adapter import (
    AdapterPath,
    default_counterfactual_path,
    find_adapter,
    load_adapter_path,
)
from memedit.counterfactual.base import CounterfactualPath, TemplatePath
from memedit.counterfactual.lora import LoraConfig, LowRankAdapter

__all__ = [
    "AdapterPath",
    "CounterfactualPath",
    "LoraConfig",
    "LowRankAdapter",
    "TemplatePath",
    "default_counterfactual_path",
    "find_adapter",
    "load_adapter_path",
]
