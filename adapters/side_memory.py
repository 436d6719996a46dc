"""WISE's side memory: per-edit deltas in knowledge shards, merged into one memory, and routing.

Every edit contributes one *item*: its trained change to the side memory (the values at its
shard's mask positions, float16), the activations of its prompt's in-scope tokens at the side
memory's input (for the routing threshold), and the settings every item of a memory shares
(module, matrix shape, number of shards, mask ratio and seed, merge density, threshold ratio).

The memory's state is a deterministic function of its items, taken in edit-id order:

* a shard's delta is the float32 sum of its items' changes scattered onto its mask, a random
  subset (``mask_ratio`` of the entries, from ``seed`` and the shard's index) of the matrix;
* the side memory's delta is the TIES merge (Yadav et al., 2023) of the shards' deltas: each
  trimmed to its ``density`` largest-magnitude entries, a sign elected per entry (the sign of
  the sum), and the entries agreeing with it averaged;
* the routing threshold is ``act_ratio`` times the smallest activation score
  ``||a (W_side - W_main)||`` over the in-scope tokens of every item.

So rolling an edit back recomputes the state from the remaining items: exactly what it would be
had that edit never been committed (bit for bit when it was the latest). At inference every
token whose score exceeds the threshold is answered by the side memory (``W_main + delta``),
every other by the main memory; when none does the module's output is returned untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from memedit.errors import IntegrityError, InvalidRequestError

from .api import NonFiniteAdapterError

if TYPE_CHECKING:
    import torch

__all__ = ["SideMemory", "WiseItem", "WiseLayout", "item_from_bytes", "item_to_bytes", "ties"]

_MAGIC = b"MEMEDIT-WISE\x00"
FORMAT = 1


@dataclass(frozen=True)
class WiseLayout:
    """What every item of one side memory shares."""

    module: str
    shape: tuple[int, int]  # (output features, input features) of the memory's matrix
    shards: int
    mask_ratio: float
    seed: int
    density: float
    act_ratio: float

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nnz(self) -> int:
        return max(1, round(self.mask_ratio * self.numel()))

    def mask(self, shard: int) -> torch.Tensor:
        """Flat indices (sorted, int64, CPU) of shard ``shard``'s entries."""
        return _mask(self, shard)[0]

    def mask_digest(self, shard: int) -> str:
        return _mask(self, shard)[1]


@lru_cache(maxsize=16)
def _mask(layout: WiseLayout, shard: int) -> tuple[torch.Tensor, str]:
    import torch

    gen = torch.Generator().manual_seed(layout.seed * 1009 + shard)
    idx = torch.randperm(layout.numel(), generator=gen)[: layout.nnz()].sort().values
    return idx, hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class WiseItem:
    """One edit: its shard, the change at the shard's mask positions, its in-scope
    activations (tokens, input features), its target label and the shared layout."""

    layout: WiseLayout
    shard: int
    delta: torch.Tensor  # (nnz,) float16
    acts: torch.Tensor  # (n, in) float32
    label: str
    mask_digest: str

    def __post_init__(self) -> None:
        import torch

        if not 0 <= self.shard < self.layout.shards:
            msg = f"shard {self.shard} outside 0..{self.layout.shards - 1}"
            raise InvalidRequestError(msg, field="shard", value=self.shard)
        if self.delta.shape != (self.layout.nnz(),) or self.acts.dim() != 2:
            msg = f"WISE item shapes {tuple(self.delta.shape)}/{tuple(self.acts.shape)} mismatch"
            raise InvalidRequestError(msg, field="delta", value=tuple(self.delta.shape))
        if self.acts.shape[1] != self.layout.shape[1] or self.acts.shape[0] < 1:
            msg = f"WISE activations {tuple(self.acts.shape)} do not fit {self.layout.shape}"
            raise InvalidRequestError(msg, field="acts", value=tuple(self.acts.shape))
        if not (torch.isfinite(self.delta).all() and torch.isfinite(self.acts).all()):
            msg = f"WISE item for {self.label!r} has NaN/Inf in its change; refused"
            raise NonFiniteAdapterError(msg)


def ties(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merge of flat task vectors: trim each to its ``density`` largest magnitudes, elect
    each entry's sign from the sum, average the entries that agree with it."""
    import torch

    trimmed = []
    for d in deltas:
        if density < 1.0:
            keep = max(1, round(density * d.numel()))
            cut = d.abs().kthvalue(d.numel() - keep + 1).values if keep < d.numel() else None
            d = d if cut is None else torch.where(d.abs() >= cut, d, torch.zeros_like(d))
        trimmed.append(d)
    if len(trimmed) == 1:
        return trimmed[0].clone()
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0).clamp(min=1).to(stack.dtype)
    return torch.where(agree, stack, torch.zeros_like(stack)).sum(0) / count


@dataclass
class SideMemory:
    """The merged side memory of one module, built from items in edit-id order."""

    layout: WiseLayout
    items: dict[int, WiseItem] = field(default_factory=dict)
    shard_deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # flat float32
    delta: torch.Tensor | None = None  # (out, in) float32: W_side - W_main
    threshold: float = float("inf")
    device: Any = None
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, shard: int) -> torch.Tensor:
        if shard not in self._masks:
            self._masks[shard] = self.layout.mask(shard).to(self.device)
        return self._masks[shard]

    def add_many(self, pairs: Sequence[tuple[int, WiseItem]]) -> None:
        """Insert edits (all or none); a shard is rebuilt when an id is not its newest."""
        for edit_id, item in pairs:
            if edit_id in self.items:
                msg = f"WISE edit {edit_id} is already committed"
                raise InvalidRequestError(msg, field="edit_id", value=edit_id)
            if item.layout != self.layout:
                msg = (
                    f"WISE edit {edit_id} was trained for {item.layout}, but this side memory "
                    f"is {self.layout}; use the same settings (or roll the others back)"
                )
                raise InvalidRequestError(msg, field="hparams", value=item.layout)
            if item.mask_digest != self.layout.mask_digest(item.shard):
                msg = f"WISE edit {edit_id}'s shard mask does not match this machine's"
                raise IntegrityError(msg)
        rebuild: set[int] = set()
        for edit_id, item in sorted(pairs, key=lambda p: p[0]):
            newest = max((i for i, it in self.items.items() if it.shard == item.shard), default=-1)
            self.items[edit_id] = item
            if edit_id < newest or item.shard in rebuild:
                rebuild.add(item.shard)
            else:
                self._accumulate(item)
        self.items = dict(sorted(self.items.items()))
        for shard in rebuild:
            self._rebuild_shard(shard)
        self.merge()

    def remove(self, edit_id: int) -> WiseItem:
        item = self.items.pop(edit_id)
        self._rebuild_shard(item.shard)
        self.merge()
        return item

    def _accumulate(self, item: WiseItem) -> None:
        import torch

        flat = self.shard_deltas.get(item.shard)
        if flat is None:
            flat = torch.zeros(self.layout.numel(), dtype=torch.float32, device=self.device)
        change = torch.zeros_like(flat)
        change[self.mask(item.shard)] = item.delta.to(device=self.device, dtype=torch.float32)
        self.shard_deltas[item.shard] = flat + change

    def _rebuild_shard(self, shard: int) -> None:
        self.shard_deltas.pop(shard, None)
        for item in self.items.values():
            if item.shard == shard:
                self._accumulate(item)

    def merge(self) -> None:
        """Recompute the merged delta and the routing threshold from the shards and items."""
        import torch

        parts = [self.shard_deltas[s] for s in sorted(self.shard_deltas)]
        if not self.items or not parts:
            self.delta, self.threshold = None, float("inf")
            return
        merged = ties(parts, self.layout.density).view(self.layout.shape)
        if not bool(torch.isfinite(merged).all()):
            msg = f"merging the WISE shards at {self.layout.module} gives NaN/Inf; refused"
            raise NonFiniteAdapterError(msg)
        acts = torch.cat([it.acts.to(self.device, torch.float32) for it in self.items.values()])
        lowest = float((acts @ merged.T).norm(dim=-1).min())
        self.delta, self.threshold = merged, self.layout.act_ratio * lowest

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """``||a (W_side - W_main)||`` per token for activations of shape (..., in)."""
        import torch

        if self.delta is None:
            return torch.zeros(acts.shape[:-1], device=acts.device)
        return (acts.to(torch.float32) @ self.delta.T).norm(dim=-1)

    def apply(self, acts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The module's output ``out`` with every token routed to the side memory (score above
        the threshold) given the side memory's output; ``out`` itself when none is."""
        import torch

        if self.delta is None:
            return out
        side = acts.to(torch.float32) @ self.delta.T
        hit = side.norm(dim=-1) > self.threshold
        if not bool(hit.any()):
            return out
        return torch.where(hit[..., None], out + side.to(out.dtype), out)

    def copy(self) -> SideMemory:
        """An independent copy (the tensors cloned) to train a batch on."""
        return SideMemory(
            self.layout,
            dict(self.items),
            {s: d.clone() for s, d in self.shard_deltas.items()},
            None if self.delta is None else self.delta.clone(),
            self.threshold,
            self.device,
        )

    def to(self, device: Any) -> None:
        if device == self.device:
            return
        self.device = device
        self._masks.clear()
        self.shard_deltas = {s: d.to(device) for s, d in self.shard_deltas.items()}
        if self.delta is not None:
            self.delta = self.delta.to(device)


def item_to_bytes(item: WiseItem) -> bytes:
    """One item as a blob for the edit log (JSON header + safetensors body)."""
    import torch
    from safetensors.torch import save

    lay = item.layout
    meta = {
        "format": FORMAT,
        "method": "wise",
        "module": lay.module,
        "shape": list(lay.shape),
        "shards": lay.shards,
        "mask_ratio": lay.mask_ratio,
        "seed": lay.seed,
        "density": lay.density,
        "act_ratio": lay.act_ratio,
        "shard": item.shard,
        "label": item.label,
        "mask_digest": item.mask_digest,
    }
    tensors = {
        "delta": item.delta.detach().to("cpu", torch.float16).contiguous(),
        "acts": item.acts.detach().to("cpu", torch.float32).contiguous(),
    }
    head = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return _MAGIC + len(head).to_bytes(8, "little") + head + save(tensors)


def item_from_bytes(blob: bytes) -> WiseItem:
    """Read :func:`item_to_bytes`'s blob; IntegrityError if it is not one."""
    from safetensors.torch import load

    start = len(_MAGIC) + 8
    if not isinstance(blob, (bytes, bytearray)) or bytes(blob[: len(_MAGIC)]) != _MAGIC:
        msg = "not a serialised WISE item (bad magic)"
        raise IntegrityError(msg)
    n = int.from_bytes(blob[len(_MAGIC) : start], "little")
    try:
        meta = json.loads(bytes(blob[start : start + n]).decode("utf-8"))
        if meta.get("format") != FORMAT:
            msg = f"WISE item format {meta.get('format')!r}; expected {FORMAT}"
            raise IntegrityError(msg)
        tensors = load(bytes(blob[start + n :]))
        layout = WiseLayout(
            module=str(meta["module"]),
            shape=(int(meta["shape"][0]), int(meta["shape"][1])),
            shards=int(meta["shards"]),
            mask_ratio=float(meta["mask_ratio"]),
            seed=int(meta["seed"]),
            density=float(meta["density"]),
            act_ratio=float(meta["act_ratio"]),
        )
        parts = (int(meta["shard"]), tensors["delta"], tensors["acts"], str(meta["label"]))
        digest = str(meta["mask_digest"])
    except IntegrityError:
        raise
    except Exception as exc:  # json, safetensors or a missing field
        msg = f"serialised WISE item is corrupt: {exc}"
        raise IntegrityError(msg) from exc
    shard, delta, acts, label = parts
    return WiseItem(layout, shard, delta, acts, label, digest)
