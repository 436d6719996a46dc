"""Errors of in-weight editing (all ``MemeditError`` subclasses)."""

from __future__ import annotations

from memedit.errors import IntegrityError, MemeditError

__all__ = ["BaseModelMismatchError", "DeltaStateError", "NonFiniteUpdateError"]


class NonFiniteUpdateError(MemeditError, FloatingPointError):
    """An edit produced NaN or Inf weights; nothing was written (or everything was restored)."""


class BaseModelMismatchError(IntegrityError):
    """A saved delta was applied to a model whose weights differ from the ones it was made on."""


class DeltaStateError(MemeditError, RuntimeError):
    """A delta was reverted while not applied or out of order, applied twice, or saved after
    the model moved on."""
