"""`WeightDelta`: what every in-weight edit returns — reversible, guarded and persistable.

A delta is recorded while a method edits the model::

    with WeightDelta.record(model, "rome", hparams=..., layers=(5,), requests=...) as delta:
        delta.add_to_matrix("model.layers.5.mlp.down_proj", update)   # or delta.track(name)

Before a tensor is first written its original is cloned; if the block raises (anything,
KeyboardInterrupt included) every tensor already written is restored before the exception
propagates. A non-finite value is refused before it is written (``NonFiniteUpdateError``), and
tensors changed in place (fine-tuning) are checked when the block ends, so a broken update never
survives. ``revert()`` restores the originals bit for bit.

``save(dir)`` writes only the changed tensors (``delta.safetensors``) and ``delta.json``
(method, hyperparameters, layers, the digest of the weights it was applied to, request
summaries, a sha256 per tensor). ``WeightDelta.load(dir).apply_to(model)`` writes them into a
freshly loaded base model, refusing one whose weights digest differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.errors import IntegrityError

from .digest import Fingerprint, fingerprint, model_digest, named_tensors, tensors_digest
from .errors import BaseModelMismatchError, DeltaStateError, NonFiniteUpdateError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memedit.types import EditRequest

__all__ = ["WeightDelta", "request_summary"]

FORMAT = "memedit-weight-delta"
FORMAT_VERSION = 1
TENSORS_FILE = "delta.safetensors"
META_FILE = "delta.json"


def request_summary(request: EditRequest) -> dict[str, str]:
    """What a delta's metadata keeps of each request."""
    return {"prompt": request.prompt, "target_new": request.target_new, "subject": request.subject}


def _check_finite(name: str, value: torch.Tensor) -> None:
    import torch

    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        msg = f"refusing to write {name}: the update has {bad} NaN/Inf values of {value.numel()}"
        raise NonFiniteUpdateError(msg)


def _describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """dtype, shape and sha256 of each tensor, as the metadata records (and loading checks)."""
    return {
        name: {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "sha256": _tensor_sha256(t),
        }
        for name, t in tensors.items()
    }


def _tensor_sha256(t: torch.Tensor) -> str:
    import torch

    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(raw.data).hexdigest()


class WeightDelta:
    """The tensors one edit changed: originals (to revert) and new values (to save/re-apply)."""

    def __init__(
        self,
        method: str,
        *,
        hparams: Mapping[str, Any] | None = None,
        layers: Sequence[int] = (),
        requests: Sequence[Mapping[str, Any]] = (),
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.method = method
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.layers: tuple[int, ...] = tuple(int(x) for x in layers)
        self.requests: list[dict[str, Any]] = [dict(r) for r in requests]
        self.info: dict[str, Any] = dict(info or {})
        #: Tensors a method keeps with its edit that are not weights (AlphaEdit's keys), saved
        #: and loaded with the delta.
        self.extras: dict[str, torch.Tensor] = {}
        self._model: nn.Module | None = None
        self._before: dict[str, torch.Tensor] = {}
        self._after: dict[str, torch.Tensor] = {}
        self._applied = False
        self._base_digest: str | None = None
        self._others: Fingerprint | None = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def applied(self) -> bool:
        """True while the new values are in the model."""
        return self._applied

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names this delta changes."""
        return tuple(self._after or self._before)

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The new value of every changed parameter (native layout, parameter dtype)."""
        return dict(self._after)

    def __repr__(self) -> str:
        state = "applied" if self._applied else "not applied"
        return f"WeightDelta({self.method!r}, layers={self.layers}, {list(self.names)}, {state})"

    # --- recording -----------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def record(
        cls,
        model: nn.Module,
        method: str,
        *,
        hparams: Mapping[str, Any] | None = None,
        layers: Sequence[int] = (),
        requests: Sequence[Mapping[str, Any]] = (),
    ) -> Iterator[WeightDelta]:
        """Record the writes of the block into a new delta; on any exception restore them."""
        delta = cls(method, hparams=hparams, layers=layers, requests=requests)
        delta._model = model
        delta._applied = True
        try:
            yield delta
        except BaseException:
            delta._restore()
            delta._applied = False
            raise
        delta._seal()

    def _param(self, name: str) -> torch.nn.Parameter:
        if self._model is None:
            msg = f"this {self.method} delta is not bound to a model (load it, then apply_to)"
            raise DeltaStateError(msg)
        return self._model.get_parameter(name)

    def track(self, name: str) -> torch.nn.Parameter:
        """The parameter ``name``, its original saved first: for methods that change it in place
        (an optimiser step). Its new value is checked for NaN/Inf when recording ends."""
        param = self._param(name)
        if name not in self._before:
            self._before[name] = param.detach().clone()
        return param

    def original(self, name: str) -> torch.Tensor:
        """The value parameter ``name`` had before this delta first touched it."""
        if name not in self._before:
            msg = f"{name} was not touched by this {self.method} delta"
            raise KeyError(msg)
        return self._before[name]

    def write(self, name: str, value: torch.Tensor) -> None:
        """Set parameter ``name`` (native layout) to ``value``, refusing non-finite values."""
        import torch

        param = self._param(name)
        if tuple(value.shape) != tuple(param.shape):
            msg = f"{name} has shape {tuple(param.shape)}, the new value {tuple(value.shape)}"
            raise ValueError(msg)
        value = value.detach().to(device=param.device, dtype=param.dtype)
        _check_finite(name, value)
        self.track(name)
        with torch.no_grad():
            param.copy_(value)

    def add_to_matrix(self, module_name: str, update: torch.Tensor) -> None:
        """Add ``update`` — shaped (out_features, in_features), any float dtype — to the weight
        of ``module_name``; summed in float64 and cast once. Works for transposed (Conv1D)
        weights alike."""
        import torch

        from memedit.spec import weight_matrix

        assert self._model is not None
        view = weight_matrix(self._model, module_name)
        if tuple(update.shape) != tuple(view.shape):
            msg = (
                f"{module_name} is {tuple(view.shape)} (out, in), the update {tuple(update.shape)}"
            )
            raise ValueError(msg)
        new = (view.detach().double() + update.to(view.device, torch.float64)).to(view.dtype)
        name = f"{module_name}.weight" if module_name else "weight"
        _check_finite(name, new)
        self.track(name)
        with torch.no_grad():
            view.copy_(new)

    def _restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, original in reversed(self._before.items()):
                self._param(name).copy_(original)

    def _seal(self) -> None:
        """End of recording: check in-place changes, keep the new values, forget no-ops."""
        import torch

        try:
            for name in list(self._before):
                current = self._param(name).detach()
                _check_finite(name, current)
                if torch.equal(current, self._before[name]):
                    del self._before[name]
                else:
                    self._after[name] = current.clone()
        except BaseException:
            self._restore()
            self._applied = False
            self._after.clear()
            raise
        self._remember_others()

    def _remember_others(self) -> None:
        assert self._model is not None
        self._others = fingerprint(self._untouched())
        if self._others is None:  # cannot tell later whether the model moved on: digest now
            self._base_digest = self._substituted_digest()

    def _untouched(self) -> list[tuple[str, torch.Tensor]]:
        assert self._model is not None
        return [(n, t) for n, t in named_tensors(self._model) if n not in self._after]

    def _substituted_digest(self) -> str:
        assert self._model is not None
        items = named_tensors(self._model)
        return tensors_digest((n, self._before.get(n, t)) for n, t in items)

    # --- revert / re-apply ------------------------------------------------------------------

    def revert(self, *, force: bool = False) -> None:
        """Restore every changed tensor to its original, bit for bit.

        Refuses (``DeltaStateError``) when a tensor no longer holds this delta's value — a
        later edit wrote it, so reverting this one would undo that one too: revert newest
        first, or pass ``force=True`` to restore the originals anyway."""
        import torch

        if not self._applied:
            msg = f"this {self.method} delta is not applied; nothing to revert"
            raise DeltaStateError(msg)
        moved = [n for n, t in self._after.items() if not torch.equal(self._param(n), t)]
        if moved and not force:
            msg = (
                f"{moved[0]} was changed after this {self.method} delta was applied; revert "
                "later edits first (newest first) or pass force=True"
            )
            raise DeltaStateError(msg)
        self._restore()
        self._applied = False

    @property
    def base_digest(self) -> str:
        """Digest of the weights this delta was applied to (``memedit.intrinsic.model_digest``
        of the unedited model). Computed on first use; that needs the model not to have been
        changed elsewhere since the edit (save a delta before making the next one)."""
        if self._base_digest is None:
            if self._model is None or not self._after:
                msg = "this delta has no base model to take a digest of"
                raise DeltaStateError(msg)
            if fingerprint(self._untouched()) != self._others:
                msg = (
                    f"the model changed outside this {self.method} delta since it was applied; "
                    "its base digest can no longer be taken (save each delta before the next edit)"
                )
                raise DeltaStateError(msg)
            self._base_digest = self._substituted_digest()
        return self._base_digest

    def apply_to(self, model: nn.Module, *, check_digest: bool = True) -> WeightDelta:
        """Write the saved new values into ``model`` (refusing one whose weights digest differs
        from :attr:`base_digest`); returns this delta, now revertible on ``model``."""
        if self._applied:
            msg = f"this {self.method} delta is already applied; revert it first"
            raise DeltaStateError(msg)
        if not self._after:
            msg = f"this {self.method} delta changes no tensor; nothing to apply"
            raise DeltaStateError(msg)
        expected = self.base_digest
        if check_digest:
            actual = model_digest(model)
            if actual != expected:
                msg = (
                    f"this {self.method} delta was made on weights with digest {expected[:16]}…, "
                    f"the model given has {actual[:16]}…; load the same base model (and any "
                    "earlier deltas) first"
                )
                raise BaseModelMismatchError(msg)
        after, self._after = self._after, {}
        self._before = {}
        self._model = model
        self._applied = True
        try:
            for name, value in after.items():
                self.write(name, value)
        except BaseException:
            self._restore()
            self._applied = False
            self._after = after
            raise
        self._after = after
        self._remember_others()
        return self

    # --- persistence ---------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What ``delta.json`` holds."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "layers": list(self.layers),
            "base_digest": self.base_digest,
            "requests": self.requests,
            "info": self.info,
            "extras": _describe(self.extras),
            "tensors": _describe(self._after),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``delta.safetensors`` (changed tensors only) and ``delta.json`` atomically."""
        from safetensors.torch import save_file

        if not self._after:
            msg = f"this {self.method} delta changes no tensor; nothing to save"
            raise DeltaStateError(msg)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tensors = self._payload()
        tmp_t, tmp_m = out / f".{TENSORS_FILE}.tmp", out / f".{META_FILE}.tmp"
        save_file(tensors, str(tmp_t), metadata={"format": FORMAT})
        tmp_m.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp_t, out / TENSORS_FILE)
        os.replace(tmp_m, out / META_FILE)  # the metadata last: it names what must be there
        return out

    def _payload(self) -> dict[str, torch.Tensor]:
        tensors = {n: t.detach().cpu().contiguous() for n, t in self._after.items()}
        for name, t in self.extras.items():
            tensors[_EXTRA + name] = t.detach().cpu().contiguous()
        return tensors

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> WeightDelta:
        """Read a saved delta (not applied to anything yet; see :meth:`apply_to`)."""
        from safetensors.torch import load_file

        src = Path(directory)
        try:
            text = (src / META_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            msg = f"{src} holds no {META_FILE}; not a saved WeightDelta"
            raise IntegrityError(msg) from None
        meta = _parse_meta(text, str(src / META_FILE))
        return cls._from_saved(meta, load_file(str(src / TENSORS_FILE)), str(src))

    def to_bytes(self) -> bytes:
        """The delta as one blob (what :meth:`save` writes, in one piece), e.g. for the edit
        log; :meth:`from_bytes` reads it back."""
        from safetensors.torch import save

        if not self._after:
            msg = f"this {self.method} delta changes no tensor; nothing to serialise"
            raise DeltaStateError(msg)
        meta = json.dumps(self.metadata(), ensure_ascii=False).encode("utf-8")
        body = save(self._payload(), metadata={"format": FORMAT})
        return _BLOB_MAGIC + len(meta).to_bytes(8, "little") + meta + body

    @classmethod
    def from_bytes(cls, blob: bytes) -> WeightDelta:
        """Read a delta written by :meth:`to_bytes` (not applied to anything yet)."""
        from safetensors.torch import load

        head = len(_BLOB_MAGIC) + 8
        if (
            not isinstance(blob, (bytes, bytearray))
            or bytes(blob[: len(_BLOB_MAGIC)]) != _BLOB_MAGIC
        ):
            msg = "not a serialised WeightDelta (bad magic)"
            raise IntegrityError(msg)
        n = int.from_bytes(blob[len(_BLOB_MAGIC) : head], "little")
        if head + n > len(blob):
            msg = f"serialised WeightDelta is truncated: {len(blob)} bytes, needs {head + n}"
            raise IntegrityError(msg)
        try:
            text = bytes(blob[head : head + n]).decode("utf-8")
            tensors = load(bytes(blob[head + n :]))
        except Exception as exc:  # UnicodeDecodeError, or safetensors' own error type
            msg = f"serialised WeightDelta is corrupt: {exc}"
            raise IntegrityError(msg) from exc
        return cls._from_saved(_parse_meta(text, "serialised delta"), tensors, "serialised delta")

    @classmethod
    def _from_saved(
        cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str
    ) -> WeightDelta:
        _verify(where, meta["tensors"], tensors)
        extras = meta.get("extras") or {}
        _verify(
            where, extras, {n[len(_EXTRA) :]: t for n, t in tensors.items() if n.startswith(_EXTRA)}
        )
        delta = cls(
            meta["method"],
            hparams=meta.get("hparams"),
            layers=meta.get("layers", ()),
            requests=meta.get("requests", ()),
            info=meta.get("info"),
        )
        delta._after = {name: tensors[name] for name in meta["tensors"]}
        delta.extras = {name: tensors[_EXTRA + name] for name in extras}
        delta._base_digest = str(meta["base_digest"])
        return delta


_BLOB_MAGIC = b"MEMEDIT-DELTA1\n"
_EXTRA = "extra::"  # prefix of extras in the safetensors body (weight names have no "::")


def _parse_meta(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{where} is not valid JSON: {exc}"
        raise IntegrityError(msg) from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or meta.get("version") != FORMAT_VERSION
    ):
        msg = f"{where} is not a {FORMAT} v{FORMAT_VERSION} record"
        raise IntegrityError(msg)
    return meta


def _verify(where: str, expected: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    missing: Iterable[str] = sorted(set(expected) - set(tensors))
    for name in missing:
        msg = f"{where}: tensor {name!r} named in its metadata is missing"
        raise IntegrityError(msg)
    for name, info in expected.items():
        if _tensor_sha256(tensors[name]) != info["sha256"]:
            msg = f"{where}: tensor {name!r} fails its sha256 check (corrupt?)"
            raise IntegrityError(msg)
