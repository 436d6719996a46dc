"""Scope classifier: does a query ask about the fact of a retrieved edit?

`load_scope_classifier()` returns the default one: pair features from the bundled frozen
all-MiniLM-L6-v2 (subject-masked sentence cosines, token alignment, subject match) fed to a
small MLP trained on the KnowEdit train files (``python -m memedit.scope.train``).
"""

from __future__ import annotations

from memedit.scope.base import ScopeClassifier
from memedit.scope.classifier import DEFAULT_HEAD, MiniLMScopeClassifier, load_scope_classifier
from memedit.scope.head import ScopeHead, ScopeHeadError

__all__ = [
    "DEFAULT_HEAD",
    "MiniLMScopeClassifier",
    "ScopeClassifier",
    "ScopeHead",
    "ScopeHeadError",
    "load_scope_classifier",
]
