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
import itertools
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
FORMAT = 2  # 2: the key router (items of format 1 are read as the activation router's)
ROUTERS = ("activation", "keys")


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
    router: str = "activation"
    router_module: str = ""  # the key router's module (its input is matched against the keys)
    router_threshold: float = 0.0  # the key router's cosine threshold
    norm_digest: str = ""  # the key router's standardisation (mean, std) every item shares

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
    keys: torch.Tensor | None = None  # key router: (k, in_router) unit vectors, float16
    norm: torch.Tensor | None = None  # key router: (2, in_router) mean and std, float32
    group: int = 0  # which of the memory's groups (own merged delta and keys) it belongs to
    answer_tokens: int = 0  # key router: its target's length in tokens (0: no decoding limit)
    offsets: torch.Tensor | None = None  # key router: (k,) each key's threshold over the layout's

    def __post_init__(self) -> None:
        import torch

        if not isinstance(self.group, int) or self.group < 0:
            msg = f"WISE item group must be a non-negative integer, got {self.group!r}"
            raise InvalidRequestError(msg, field="group", value=self.group)
        if not isinstance(self.answer_tokens, int) or self.answer_tokens < 0:
            length = self.answer_tokens
            msg = f"WISE item answer_tokens must be a non-negative integer, got {length!r}"
            raise InvalidRequestError(msg, field="answer_tokens", value=length)
        if self.layout.router not in ROUTERS:
            msg = f"unknown WISE router {self.layout.router!r}; choose one of {list(ROUTERS)}"
            raise InvalidRequestError(msg, field="router", value=self.layout.router)
        if self.layout.router == "keys":
            k, n = self.keys, self.norm
            if (
                k is None
                or n is None
                or k.dim() != 2
                or k.shape[0] < 1
                or n.shape != (2, k.shape[1])
            ):
                got = None if k is None else tuple(k.shape)
                msg = f"WISE key-router item for {self.label!r} needs keys and norm, got {got}"
                raise InvalidRequestError(msg, field="keys", value=got)
            if not (torch.isfinite(k).all() and torch.isfinite(n).all()):
                msg = f"WISE item for {self.label!r} has NaN/Inf in its router keys; refused"
                raise NonFiniteAdapterError(msg)
            off = self.offsets
            if off is not None and (
                off.shape != (k.shape[0],) or not bool(torch.isfinite(off).all())
            ):
                msg = f"WISE item for {self.label!r}: key offsets {tuple(off.shape)} do not fit"
                raise InvalidRequestError(msg, field="offsets", value=tuple(off.shape))
            if norm_digest(n) != self.layout.norm_digest:
                msg = f"WISE item for {self.label!r}: its router norm does not match its layout"
                raise IntegrityError(msg)

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


def norm_digest(norm: torch.Tensor) -> str:
    """Short digest of a key router's (mean, std), which every item of a memory shares."""
    import torch

    data = norm.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def standardise(acts: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Activations ``(..., in)`` standardised by ``norm`` (mean, std) and scaled to unit
    length: the key router compares these by cosine."""
    import torch

    z = (acts.to(torch.float32) - norm[0]) / norm[1]
    return z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)


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
    """The merged side memory of one module, built from items in edit-id order.

    Items fall into *groups* (``WiseItem.group``; one group unless the adapter's
    ``group_size`` starts a new one every so many edits, the paper's WISE-Retrieve): each
    group is merged into a delta of its own from its own shards, and the key router sends a
    row to the group whose keys it matches best."""

    layout: WiseLayout
    items: dict[int, WiseItem] = field(default_factory=dict)
    shard_deltas: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # flat
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> (out, in) float32
    threshold: float = float("inf")
    device: Any = None
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> (K, in_router)
    norm: torch.Tensor | None = None  # key router: (2, in_router)
    windows: dict[int, int] = field(default_factory=dict)  # group -> decoding window (0: none)
    _flat: tuple[torch.Tensor, list[int]] | None = (
        None  # every group's keys (and offsets), one matrix
    )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def delta(self) -> torch.Tensor | None:
        """Group 0's merged delta ``W_side - W_main`` (the whole memory's with one group)."""
        return self.deltas.get(0)

    def groups(self) -> list[int]:
        return sorted(self.deltas)

    def count(self, group: int) -> int:
        return sum(1 for it in self.items.values() if it.group == group)

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
        rebuild: set[tuple[int, int]] = set()
        for edit_id, item in sorted(pairs, key=lambda p: p[0]):
            slot = (item.group, item.shard)
            newest = max((i for i, it in self.items.items() if _slot(it) == slot), default=-1)
            self.items[edit_id] = item
            if edit_id < newest or slot in rebuild:
                rebuild.add(slot)
            else:
                self._accumulate(item)
        self.items = dict(sorted(self.items.items()))
        for slot in rebuild:
            self._rebuild(slot)
        self.merge({item.group for _, item in pairs})

    def remove(self, edit_id: int) -> WiseItem:
        item = self.items.pop(edit_id)
        self._rebuild(_slot(item))
        self.merge({item.group})
        return item

    def _accumulate(self, item: WiseItem) -> None:
        import torch

        flat = self.shard_deltas.get(_slot(item))
        if flat is None:
            flat = torch.zeros(self.layout.numel(), dtype=torch.float32, device=self.device)
        change = torch.zeros_like(flat)
        change[self.mask(item.shard)] = item.delta.to(device=self.device, dtype=torch.float32)
        self.shard_deltas[_slot(item)] = flat + change

    def _rebuild(self, slot: tuple[int, int]) -> None:
        self.shard_deltas.pop(slot, None)
        for item in self.items.values():
            if _slot(item) == slot:
                self._accumulate(item)

    def merge(self, groups: set[int] | None = None) -> None:
        """Recompute the merged delta and keys of ``groups`` (None: every group) from their
        shards and items, and the activation router's threshold."""
        import torch

        self._flat = None
        todo = {it.group for it in self.items.values()} | set(self.deltas)
        for group in sorted(todo if groups is None else groups):
            parts = [d for (g, _), d in sorted(self.shard_deltas.items()) if g == group]
            members = [it for it in self.items.values() if it.group == group]
            if not members or not parts:
                self.deltas.pop(group, None)
                self.keys.pop(group, None)
                self.windows.pop(group, None)
                continue
            merged = ties(parts, self.layout.density).view(self.layout.shape)
            if not bool(torch.isfinite(merged).all()):
                msg = f"merging the WISE shards at {self.layout.module} gives NaN/Inf; refused"
                raise NonFiniteAdapterError(msg)
            self.deltas[group] = merged
            lengths = [it.answer_tokens for it in members]
            self.windows[group] = 0 if 0 in lengths else max(lengths)
            if self.layout.router == "keys":
                keyed = [it for it in members if it.keys is not None]
                self.keys[group] = torch.cat(
                    [it.keys.to(self.device, torch.float32) for it in keyed]  # type: ignore[union-attr]
                )
        if not self.items:
            self.threshold, self.norm = float("inf"), None
            return
        lowest = min(
            float(
                (it.acts.to(self.device, torch.float32) @ self.deltas[it.group].T)
                .norm(dim=-1)
                .min()
            )
            for it in self.items.values()
        )
        self.threshold = self.layout.act_ratio * lowest
        first = next(iter(self.items.values()))
        if self.layout.router == "keys" and first.norm is not None:
            self.norm = first.norm.to(self.device, torch.float32)

    def group_sims(self, acts: torch.Tensor) -> torch.Tensor:
        """Key router: each token's best cosine with the keys of each group, ``(..., groups)``
        in the order of :meth:`groups` (standardised activations at the router's module),
        each key's cosine less its offset (a key with a higher threshold than the layout's,
        such as one at a fragment of a word, must match that much better)."""
        import torch

        groups = self.groups()
        if self.norm is None or not groups:
            return torch.full((*acts.shape[:-1], 0), -1.0, device=acts.device)
        z = standardise(acts, self.norm)
        if self._flat is None:
            self._flat = self._stack(groups)
        keys, bounds = self._flat
        if keys.shape[1] > z.shape[-1]:  # offsets folded in: z . k - offset in one product
            z = torch.cat([z, -torch.ones_like(z[..., :1])], dim=-1)
        sims = (z.to(keys.dtype) @ keys.T).float()
        return torch.stack(
            [sims[..., a:b].amax(dim=-1) for a, b in itertools.pairwise(bounds)],
            dim=-1,
        )

    def _stack(self, groups: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Every group's keys in one matrix (a column of offsets appended when some key has
        one) and where each group's rows start: the router's match is one product. The
        matrix is float16, as the keys are stored: the product reads it whole for every token,
        and at 500 edits (4,724 keys, 29 MB in float32) that read, not the arithmetic, is the
        router's cost inside a forward; cosines move by < 1e-4 (BENCHMARKS.md)."""
        import torch

        keys = [self.keys[g] for g in groups]
        keyed = [it for it in self.items.values() if it.keys is not None]
        if any(it.offsets is not None and bool(it.offsets.any()) for it in keyed):
            keys = [  # each group's offsets in the order merge() concatenated its keys
                torch.cat(
                    [k, torch.cat([_offsets(it) for it in keyed if it.group == g])[:, None].to(k)],
                    dim=1,
                )
                for g, k in zip(groups, keys, strict=True)
            ]
        bounds = [0]
        for k in keys:
            bounds.append(bounds[-1] + k.shape[0])
        return torch.cat(keys).to(torch.float16), bounds

    def window_of(self, index: torch.Tensor) -> torch.Tensor:
        """Each routed row's decoding window (``index``: its group as an index into
        :meth:`groups`): the longest target, in tokens, among its group's items; a very large
        number where an item's length is unknown (no limit)."""
        import torch

        sizes = [self.windows.get(g, 0) or 2**30 for g in self.groups()] or [2**30]
        table = torch.tensor(sizes, dtype=torch.long, device=index.device)
        return table[index.clamp(0, len(sizes) - 1)]

    def match(self, acts: torch.Tensor) -> torch.Tensor:
        """Key router: whether each token's activation ``(..., in_router)`` at the router's
        module is within the cosine threshold of some item's key (standardised)."""
        sims = self.group_sims(acts)
        if sims.shape[-1] == 0:
            return sims.new_zeros(sims.shape[:-1], dtype=bool)  # type: ignore[call-overload]
        return sims.amax(dim=-1) >= self.layout.router_threshold

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """``||a (W_side - W_main)||`` per token for activations of shape (..., in) (group 0)."""
        import torch

        if self.delta is None:
            return torch.zeros(acts.shape[:-1], device=acts.device)
        return (acts.to(torch.float32) @ self.delta.T).norm(dim=-1)

    def apply(
        self,
        acts: torch.Tensor,
        out: torch.Tensor,
        route: torch.Tensor | None = None,
        group: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The module's output ``out`` with every routed token given the side memory's
        output; ``out`` itself when none is. Routed: ``route`` (the key router's decision, a
        bool per token, with ``group``: each token's group as an index into :meth:`groups`,
        default the first) when given, else the activation router's (score above the
        threshold, group 0)."""
        import torch

        if not self.deltas or (route is not None and not bool(route.any())):
            return out
        if route is None:
            if self.delta is None:
                return out
            side = acts.to(torch.float32) @ self.delta.T
            hit = side.norm(dim=-1) > self.threshold
            if not bool(hit.any()):
                return out
            return torch.where(hit[..., None], out + side.to(out.dtype), out)
        if group is None:
            group = torch.zeros(route.shape, dtype=torch.long, device=route.device)
        for index, g in enumerate(self.groups()):
            sel = route & (group == index)
            if not bool(sel.any()):
                continue
            side = acts.to(torch.float32) @ self.deltas[g].T
            out = torch.where(sel[..., None], out + side.to(out.dtype), out)
        return out

    def copy(self) -> SideMemory:
        """An independent copy (the tensors cloned) to train a batch on."""
        return SideMemory(
            self.layout,
            dict(self.items),
            {s: d.clone() for s, d in self.shard_deltas.items()},
            {g: d.clone() for g, d in self.deltas.items()},
            self.threshold,
            self.device,
            keys={g: k.clone() for g, k in self.keys.items()},
            norm=self.norm,
            windows=dict(self.windows),
        )

    def to(self, device: Any) -> None:
        if device == self.device:
            return
        self.device = device
        self._masks.clear()
        self._flat = None
        self.shard_deltas = {s: d.to(device) for s, d in self.shard_deltas.items()}
        self.deltas = {g: d.to(device) for g, d in self.deltas.items()}
        self.keys = {g: k.to(device) for g, k in self.keys.items()}
        if self.norm is not None:
            self.norm = self.norm.to(device)


def _offsets(item: WiseItem) -> torch.Tensor:
    """An item's per-key threshold offsets (zeros when it has none)."""
    import torch

    assert item.keys is not None
    if item.offsets is None:
        return torch.zeros(item.keys.shape[0])
    return item.offsets


def _slot(item: WiseItem) -> tuple[int, int]:
    return (item.group, item.shard)


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
        "router": lay.router,
        "router_module": lay.router_module,
        "router_threshold": lay.router_threshold,
        "norm_digest": lay.norm_digest,
        "shard": item.shard,
        "group": item.group,
        "answer_tokens": item.answer_tokens,
        "label": item.label,
        "mask_digest": item.mask_digest,
    }
    tensors = {
        "delta": item.delta.detach().to("cpu", torch.float16).contiguous(),
        "acts": item.acts.detach().to("cpu", torch.float32).contiguous(),
    }
    if item.keys is not None and item.norm is not None:
        tensors["keys"] = item.keys.detach().to("cpu", torch.float16).contiguous()
        tensors["norm"] = item.norm.detach().to("cpu", torch.float32).contiguous()
        if item.offsets is not None:
            tensors["offsets"] = item.offsets.detach().to("cpu", torch.float32).contiguous()
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
        if meta.get("format") not in (1, FORMAT):
            msg = f"WISE item format {meta.get('format')!r}; expected {FORMAT} (or 1)"
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
            router=str(meta.get("router", "activation")),
            router_module=str(meta.get("router_module", "")),
            router_threshold=float(meta.get("router_threshold", 0.0)),
            norm_digest=str(meta.get("norm_digest", "")),
        )
        parts = (int(meta["shard"]), tensors["delta"], tensors["acts"], str(meta["label"]))
        digest = str(meta["mask_digest"])
        keys, norm, offsets = tensors.get("keys"), tensors.get("norm"), tensors.get("offsets")
        group = int(meta.get("group", 0))
        answer_tokens = int(meta.get("answer_tokens", 0))
    except IntegrityError:
        raise
    except Exception as exc:  # json, safetensors or a missing field
        msg = f"serialised WISE item is corrupt: {exc}"
        raise IntegrityError(msg) from exc
    shard, delta, acts, label = parts
    return WiseItem(
        layout, shard, delta, acts, label, digest, keys, norm, group, answer_tokens, offsets
    )
