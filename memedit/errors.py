"""Exceptions raised by memedit. Every message names what is wrong and the offending value."""

from __future__ import annotations


class MemeditError(Exception):
    """Base class of every error memedit raises on purpose."""


class InvalidRequestError(MemeditError, ValueError):
    """An edit request (or a record it was built from) is malformed."""

    def __init__(self, message: str, *, field: str, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class UnknownModelError(MemeditError, LookupError):
    """A model name is neither in the catalogue nor a local directory nor a loadable hub id."""


class UnknownArchitectureError(MemeditError, LookupError):
    """No ModelSpec is registered for a model's ``config.model_type``."""


class EmbedderMismatchError(MemeditError):
    """An edit memory was opened with a different embedder than the one that wrote it."""


class EditNotFoundError(MemeditError, KeyError):
    """No edit with this id exists in the log."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "edit not found"


class AlreadyRolledBackError(MemeditError):
    """The edit was rolled back before."""


class IntegrityError(MemeditError):
    """A file on disk failed its checksum (downloaded weights, a saved index, a delta)."""


class ModulePathError(MemeditError, LookupError):
    """A ModelSpec module path template does not resolve to a module of the loaded model."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class ModelFetchError(MemeditError, RuntimeError):
    """A catalogue model's files could not be found installed nor fetched from the package index."""


class IndexFileError(IntegrityError):
    """A saved vector index file is unreadable, truncated or fails its checksum."""


class StoreSchemaError(MemeditError):
    """An edit log's tables were written by an incompatible version of memedit (or are not
    memedit's)."""
