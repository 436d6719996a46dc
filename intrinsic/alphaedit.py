"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for
Language Models"): MEMIT's update projected onto the null space of the preserved knowledge.

``P = B Bᵀ`` projects onto the span ``B`` of the eigenvectors of ``K₀K₀ᵀ`` (here the key
statistics ``E[k kᵀ]`` of :class:`~memedit.intrinsic.stats.KeyStatistics`) whose eigenvalues
are at most ``nullspace_threshold`` times the largest: directions ordinary text barely uses.
Each layer of MEMIT's loop (:func:`~memedit.intrinsic.memit.spread_update`) then writes

    Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹          (the paper's form, keys as columns)
      = R Kᵀ B (Bᵀ (K_p K_pᵀ + K Kᵀ) B + α I)⁻¹ Bᵀ   (the same matrix, a symmetric solve)

with ``K_p`` the keys of the edits made before in the same sequence and ``α = l2_weight``.
So ``Δ (I − P) = 0``: the preserved keys' outputs move only by their small remainder in the
null space (``‖Δ k₀‖ ≤ ‖Δ‖ ‖P k₀‖``). The second form is MEMIT's least squares on the keys
expressed in ``B``'s coordinates with the covariance ``Bᵀ K_p K_pᵀ B + α I`` — the difference
between the two methods is :func:`alphaedit_update`.

Sequential editing keeps ``K_p K_pᵀ`` (and ``B``, computed once from the unedited model's
statistics) in an explicit :class:`AlphaEditState` the caller owns and passes to every call::

    state = AlphaEditState()
    for batch in batches:
        apply_edit("alphaedit", model, tok, batch, state=state)
    state.save("alphaedit-state.safetensors")     # AlphaEditState.load(...) to continue later

Without a state each call is a first edit (``K_p = 0``). The state grows only when a call
succeeds; reverting a delta does not remove its keys from the state (keep a :meth:`copy` made
before the call to undo that too). Each delta also keeps its keys (``delta.extras``, saved with
it), so :meth:`AlphaEditState.from_deltas` rebuilds the state of the deltas still applied —
what ``EditableModel`` does when it reopens a memory or rolls an AlphaEdit batch back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memedit.errors import IntegrityError, InvalidRequestError

from .api import EditContext, register_method
from .compute import least_squares_update
from .hparams import check_float
from .memit import SpreadHparams, spread_update

if TYPE_CHECKING:
    import torch

    from .delta import WeightDelta

__all__ = [
    "AlphaEditHparams",
    "AlphaEditState",
    "alphaedit_update",
    "edit_alphaedit",
    "null_space_basis",
]

logger = logging.getLogger(__name__)

STATE_FORMAT = "memedit-alphaedit-state"
#: Name prefix of the per-layer keys an AlphaEdit delta keeps (``WeightDelta.extras``).
KEYS_EXTRA = "alphaedit.keys."
STATE_VERSION = 1


@dataclass(frozen=True)
class AlphaEditHparams(SpreadHparams):
    """AlphaEdit: MEMIT's layers and value optimisation (:class:`~memedit.intrinsic.memit.
    SpreadHparams`), then ``nullspace_threshold``: eigenvalues of ``E[k kᵀ]`` at most this
    fraction of the largest count as null (the paper drops the non-zero ones of ``K₀K₀ᵀ``; on
    finite text none is exactly zero), and ``l2_weight`` (α): the ridge of the solve.

    Measured on SmolLM2-135M (20 ZsRE edits in one batch, layers 3-7,
    ``benchmarks/memit_edit.py``): the threshold keeps 900-1100 of 1536 directions; α 0.1 / 1 /
    10 / 100 give Edit Succ. 98 / 97 / 97 / 70, rephrase 75 / 74 / 74 / 47, Locality 49 / 49 /
    52 / 58; threshold 3e-3 with α 10: 95 / 70 / 53. Defaults: 1e-2 and 10.

    For long sequences of edits set ``clamp_norm_factor=1`` (values no larger than what the
    MLP wrote at the subject): over 500 ZsRE edits in batches of 100 it keeps 64.3 Edit Succ.
    and 44.5 Locality at T = 500 against 35.8 / 26.8 with the default 4 (docs/eval/NOTES.md).
    It is not the default because one edit at a time it generalises less: over the first 200
    ZsRE dev records, paired, rephrasings fall 12.7 ± 2.0 points and Edit Succ. 1.4 ± 0.9
    while Locality rises 6.5 ± 1.4 (96.47 / 64.65 / 71.98 against 97.83 / 77.33 / 65.52)."""

    nullspace_threshold: float = 1e-2
    l2_weight: float = 10.0
    #: λ: weight of the key statistics ``E[k kᵀ]`` inside the null space (MEMIT's term, which
    #: the paper drops): 0 leaves the null-space directions free; larger makes the update
    #: avoid those of them ordinary text still uses (where the null space is not empty of it).
    #: On SmolLM2-135M it trades Edit Succ. for Locality and does not slow a sequence's decline
    #: (batches of 100 ZsRE edits, F = 1: λ 1000 gives 80.4 / 68.3 at T = 100 against 85.7 /
    #: 63.9, BENCHMARKS.md), so it is off.
    general_weight: float = 0.0
    #: β: weight of the earlier edits' keys ``K_p K_pᵀ`` in the solve (the paper's 1); larger
    #: keeps a sequence's earlier edits from being overwritten by later ones.
    preserved_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_float(owner, "nullspace_threshold", self.nullspace_threshold)
        check_float(owner, "l2_weight", self.l2_weight)
        check_float(owner, "preserved_weight", self.preserved_weight)
        check_float(owner, "general_weight", self.general_weight)
        if self.l2_weight <= 0:
            msg = f"{owner}.l2_weight must be > 0, got {self.l2_weight!r}"
            raise InvalidRequestError(msg, field="l2_weight", value=self.l2_weight)


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal columns (in, m), float64: the eigenvectors of ``second_moment`` whose
    eigenvalues are at most ``threshold`` times the largest."""
    import torch

    evals, evecs = torch.linalg.eigh(second_moment.to(torch.float64))
    keep = evals <= threshold * evals.abs().max()
    return evecs[:, keep].contiguous()


def alphaedit_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    basis: torch.Tensor,
    preserved: torch.Tensor | None,
    l2_weight: float,
    preserved_weight: float = 1.0,
    general: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Δ = Rᵀ K B (Bᵀ (β K_pᵀK_p + λ C + KᵀK) B + α I)⁻¹ Bᵀ`` (float64, (out, in)); rows of
    ``keys`` (n, in) and ``residuals`` (n, out) are requests, ``basis`` is ``B`` (in, m),
    ``preserved`` the accumulated ``K_pᵀK_p`` (in, in) or None, β = ``preserved_weight``,
    ``general`` the already weighted key statistics ``λ C`` (in, in) or None."""
    import torch

    b = basis.to(keys.device, torch.float64)
    cov = l2_weight * torch.eye(b.shape[1], dtype=torch.float64, device=b.device)
    if preserved is not None:
        cov = cov + preserved_weight * (b.T @ preserved.to(b.device, torch.float64) @ b)
    if general is not None:
        cov = cov + b.T @ general.to(b.device, torch.float64) @ b
    projected = keys.to(torch.float64) @ b  # the keys in B's coordinates
    return least_squares_update(projected, residuals, cov) @ b.T


class AlphaEditState:
    """What sequential AlphaEdit keeps between calls, per edited layer: the null-space basis
    ``B`` (made on first use from the statistics then given, with the threshold recorded) and
    ``K_pᵀK_p``, the sum of ``k kᵀ`` over the keys of every request edited so far (float64).
    One state belongs to one model's sequence of edits; it is not tied to a model object."""

    def __init__(self) -> None:
        self.preserved: dict[int, torch.Tensor] = {}
        self.bases: dict[int, torch.Tensor] = {}
        self.thresholds: dict[int, float] = {}
        self.requests = 0

    def __repr__(self) -> str:
        dims = {layer: int(b.shape[1]) for layer, b in sorted(self.bases.items())}
        return f"AlphaEditState(requests={self.requests}, null-space dims={dims})"

    def basis(self, layer: int, second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
        """``B`` for ``layer``: the stored one if it was made with ``threshold``, else made
        from ``second_moment`` now (and stored)."""
        if self.thresholds.get(layer) != threshold or layer not in self.bases:
            basis = null_space_basis(second_moment, threshold)
            if basis.shape[1] == 0:
                msg = (
                    f"nullspace_threshold {threshold} leaves no null-space direction at layer "
                    f"{layer} (nothing could be edited); raise it"
                )
                raise InvalidRequestError(msg, field="nullspace_threshold", value=threshold)
            self.bases[layer] = basis
            self.thresholds[layer] = threshold
        return self.bases[layer]

    def check(self, layer: int, width: int) -> None:
        """Refuse a state whose tensors for ``layer`` are not ``width`` keys wide."""
        for what, t in (("preserved", self.preserved.get(layer)), ("basis", self.bases.get(layer))):
            if t is not None and t.shape[0] != width:
                msg = (
                    f"AlphaEditState {what} of layer {layer} is {t.shape[0]} keys wide, the "
                    f"model's is {width}: a state from another model?"
                )
                raise InvalidRequestError(msg, field="state", value=self)

    def add(self, keys: Mapping[int, torch.Tensor], n_requests: int) -> None:
        """Preserve the keys (rows, per layer) of ``n_requests`` requests just edited."""
        import torch

        for layer, k in keys.items():
            k64 = k.to(torch.float64)
            gram = k64.T @ k64
            old = self.preserved.get(layer)
            self.preserved[layer] = gram if old is None else old.to(gram.device) + gram
        self.requests += n_requests

    @classmethod
    def from_deltas(cls, deltas: Iterable[WeightDelta]) -> AlphaEditState:
        """The state a sequence of AlphaEdit deltas (oldest first) left: ``K_pᵀK_p`` summed
        from the keys each delta keeps; the null-space bases are made again on the next edit
        (from the same statistics, so the same). A delta saved without its keys (before they
        were kept) is skipped with a warning."""
        state = cls()
        for delta in deltas:
            keys = {
                int(name.removeprefix(KEYS_EXTRA)): t
                for name, t in delta.extras.items()
                if name.startswith(KEYS_EXTRA)
            }
            if not keys:
                logger.warning(
                    "an %s delta holds no keys; its edits are not preserved", delta.method
                )
                continue
            state.add(keys, len(delta.requests))
        return state

    def copy(self) -> AlphaEditState:
        """An independent copy (tensors cloned)."""
        out = AlphaEditState()
        out.preserved = {k: v.clone() for k, v in self.preserved.items()}
        out.bases = {k: v.clone() for k, v in self.bases.items()}
        out.thresholds = dict(self.thresholds)
        out.requests = self.requests
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state to one safetensors file (atomically)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"preserved.{k}": v.detach().cpu().contiguous() for k, v in self.preserved.items()
        }
        tensors.update({f"basis.{k}": v.detach().cpu().contiguous() for k, v in self.bases.items()})
        meta = {
            "format": STATE_FORMAT,
            "version": str(STATE_VERSION),
            "requests": str(self.requests),
            "thresholds": json.dumps({str(k): v for k, v in self.thresholds.items()}),
        }
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AlphaEditState:
        """Read a state written by :meth:`save` (tensors on the CPU)."""
        from safetensors import safe_open

        state = cls()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT or meta.get("version") != str(STATE_VERSION):
                msg = f"{path} is not a {STATE_FORMAT} v{STATE_VERSION} file"
                raise IntegrityError(msg)
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                kind, layer = key.split(".")
                target = state.preserved if kind == "preserved" else state.bases
                target[int(layer)] = f.get_tensor(key)
        state.thresholds = {int(k): float(v) for k, v in json.loads(meta["thresholds"]).items()}
        state.requests = int(meta["requests"])
        return state


def edit_alphaedit(ctx: EditContext) -> None:
    """Apply ``ctx.requests`` as one AlphaEdit batch into ``ctx.delta``; ``ctx.state`` (an
    :class:`AlphaEditState`, or None for a first edit) gains their keys if it succeeds."""
    hp: AlphaEditHparams = ctx.hparams
    assert hp.layers is not None
    state: AlphaEditState = ctx.state if ctx.state is not None else AlphaEditState()
    bases, general = {}, {}
    for layer in hp.layers:  # all before the first write (see edit_memit)
        mom2 = ctx.stats.second_moment(ctx.model, ctx.tokenizer, layer, hp.stats_tokens)
        state.check(layer, int(mom2.shape[0]))
        bases[layer] = state.basis(layer, mom2, hp.nullspace_threshold)
        if hp.general_weight > 0:
            general[layer] = hp.general_weight * mom2
    ctx.delta.info["null_space_dims"] = {str(k): int(b.shape[1]) for k, b in bases.items()}
    ctx.delta.info["preserved_requests"] = state.requests

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        return alphaedit_update(
            keys,
            residuals,
            bases[layer],
            state.preserved.get(layer),
            hp.l2_weight,
            hp.preserved_weight,
            general.get(layer),
        )

    keys = spread_update(ctx, solve)
    for layer, k in keys.items():  # saved with the delta: a reopened model rebuilds its state
        ctx.delta.extras[f"{KEYS_EXTRA}{layer}"] = k.detach().float().cpu()
    state.add(keys, len(ctx.requests))


register_method("alphaedit", AlphaEditHparams, edit_alphaedit, state=AlphaEditState)
