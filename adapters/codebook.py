"""GRACE's codebook: keys, values and deferral radii at one module's output, and its upkeep.

Each edit contributes one *item*: the key (the module's output at the edit prompt's last
token), the value trained to replace it, the label (the edit's target) and its initial radius.
The codebook's *entries* follow from the items, inserted in edit-id order, by the rules of the
GRACE paper (Hartvigsen et al., 2023), with ``d`` the distance from the new key to the nearest
entry key and ``eps`` that entry's radius:

* ``d > eps + eps_init``: the new key is far from every entry: add an entry (radius
  ``eps_init``);
* otherwise, same label: *expand* the nearest entry's radius to cover the new key;
* otherwise, another label: *split*: the nearest entry's radius and the new entry's are both
  set to ``d / 2``, so the two regions no longer overlap.

Unlike the paper, an expanding edit also keeps an entry of its own (radius ``eps_init``): the
paper's expansion answers the new prompt with the neighbour's value, trained on another prompt,
which for a multi-token target often gets only part of it right, and a later split can shrink
the neighbour's radius until the new key falls outside. With its own entry (nearest-key lookup,
distance 0 to its own key) every committed edit answers its prompt with its own trained value.

Because the entries are a deterministic function of the items, rolling one edit back
rebuilds them from the remaining items: the codebook is then exactly what it would be had
that edit never been made (bit for bit when it was the latest). An output vector whose nearest
entry key lies within that entry's radius is replaced by the entry's value; any other output
passes through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memedit.errors import IntegrityError, InvalidRequestError

from .api import NonFiniteAdapterError

if TYPE_CHECKING:
    import torch

__all__ = ["Codebook", "Item", "item_from_bytes", "item_to_bytes"]

_MAGIC = b"MEMEDIT-GRACE\x00"
FORMAT = 1


@dataclass(frozen=True)
class Item:
    """One edit's contribution: key and value (float32, 1-D), label, initial radius, and the
    module the codebook sits at."""

    key: torch.Tensor
    value: torch.Tensor
    label: str
    eps_init: float
    module: str

    def __post_init__(self) -> None:
        import torch

        if self.key.dim() != 1 or self.key.shape != self.value.shape:
            msg = f"key and value must be 1-D of one shape, got {self.key.shape}/{self.value.shape}"
            raise InvalidRequestError(msg, field="value", value=tuple(self.value.shape))
        if not (torch.isfinite(self.key).all() and torch.isfinite(self.value).all()):
            msg = f"GRACE item for {self.label!r} has NaN/Inf in its key or value; refused"
            raise NonFiniteAdapterError(msg)
        if not self.eps_init >= 0.0 or self.eps_init == float("inf"):
            msg = f"eps_init must be finite and >= 0, got {self.eps_init!r}"
            raise InvalidRequestError(msg, field="eps_init", value=self.eps_init)


@dataclass
class Codebook:
    """The entries at one module, built from items in edit-id order."""

    items: dict[int, Item] = field(default_factory=dict)
    keys: torch.Tensor | None = None  # (n, d) float32
    values: torch.Tensor | None = None  # (n, d) float32
    radii: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # edit id whose key each entry is

    def __len__(self) -> int:
        return len(self.radii)

    def add(self, edit_id: int, item: Item) -> None:
        """Insert one edit (rebuilding when it is not the newest id)."""
        if edit_id in self.items:
            msg = f"edit {edit_id} is already in the codebook"
            raise InvalidRequestError(msg, field="edit_id", value=edit_id)
        newest = max(self.items, default=-1) < edit_id
        self.items[edit_id] = item
        if newest:
            self._insert(edit_id, item)
        else:
            self.items = dict(sorted(self.items.items()))
            self.rebuild()

    def remove(self, edit_id: int) -> Item:
        item = self.items.pop(edit_id)
        self.rebuild()
        return item

    def rebuild(self) -> None:
        self.keys = self.values = None
        self.radii, self.labels, self.owners = [], [], []
        for edit_id, item in self.items.items():
            self._insert(edit_id, item)

    def _insert(self, edit_id: int, item: Item) -> None:
        import torch

        key = item.key.to(torch.float32)
        if self.keys is None or self.values is None:
            self._append(edit_id, item, item.eps_init)
            return
        key = key.to(self.keys.device)
        dists = (self.keys - key).norm(dim=1)
        i = int(dists.argmin())
        d = float(dists[i])
        if d > self.radii[i] + item.eps_init:
            self._append(edit_id, item, item.eps_init)
        elif self.labels[i] == item.label:  # expand the neighbour; keep an entry of its own
            self.radii[i] = max(self.radii[i], d)
            self._append(edit_id, item, item.eps_init)
        else:  # split: neither region reaches into the other
            self.radii[i] = d / 2.0
            self._append(edit_id, item, d / 2.0)

    def _append(self, edit_id: int, item: Item, radius: float) -> None:
        import torch

        device = self.keys.device if self.keys is not None else item.key.device
        key = item.key.to(device=device, dtype=torch.float32)[None]
        value = item.value.to(device=device, dtype=torch.float32)[None]
        self.keys = key if self.keys is None else torch.cat([self.keys, key])
        self.values = value if self.values is None else torch.cat([self.values, value])
        self.radii.append(radius)
        self.labels.append(item.label)
        self.owners.append(edit_id)

    def to(self, device: torch.device) -> None:
        """Keep the entries on ``device`` (the model's)."""
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys.to(device), self.values.to(device)

    def lookup(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``hidden`` of shape (..., d): a boolean mask (...) of the vectors inside an
        entry's radius, and the index (...) of each vector's nearest entry."""
        import torch

        if self.keys is None:
            shape = hidden.shape[:-1]
            zeros = torch.zeros(shape, dtype=torch.long, device=hidden.device)
            return torch.zeros(shape, dtype=torch.bool, device=hidden.device), zeros
        flat = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32)
        dist = torch.cdist(flat, self.keys)
        best, idx = dist.min(dim=1)
        radii = torch.tensor(self.radii, dtype=torch.float32, device=flat.device)
        hit = best <= radii[idx]
        return hit.reshape(hidden.shape[:-1]), idx.reshape(hidden.shape[:-1])

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with every vector inside an entry's radius replaced by its value; the
        very same tensor when none is (out-of-scope inputs run exactly as unedited)."""
        if self.values is None:
            return hidden
        hit, idx = self.lookup(hidden)
        if not bool(hit.any()):
            return hidden
        out = hidden.clone()
        out[hit] = self.values[idx[hit]].to(hidden.dtype)
        return out


def item_to_bytes(item: Item) -> bytes:
    """One item as a blob for the edit log (JSON header + safetensors body)."""
    import torch
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "method": "grace",
        "label": item.label,
        "eps_init": item.eps_init,
        "module": item.module,
    }
    tensors = {
        "key": item.key.detach().to("cpu", torch.float32).contiguous(),
        "value": item.value.detach().to("cpu", torch.float32).contiguous(),
    }
    head = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return _MAGIC + len(head).to_bytes(8, "little") + head + save(tensors)


def item_from_bytes(blob: bytes, device: Any = None) -> Item:
    """Read :func:`item_to_bytes`'s blob; IntegrityError if it is not one."""
    from safetensors.torch import load

    start = len(_MAGIC) + 8
    if not isinstance(blob, (bytes, bytearray)) or bytes(blob[: len(_MAGIC)]) != _MAGIC:
        msg = "not a serialised GRACE item (bad magic)"
        raise IntegrityError(msg)
    n = int.from_bytes(blob[len(_MAGIC) : start], "little")
    try:
        meta = json.loads(bytes(blob[start : start + n]).decode("utf-8"))
        tensors = load(bytes(blob[start + n :]))
        if meta.get("format") != FORMAT:
            msg = f"GRACE item format {meta.get('format')!r}; expected {FORMAT}"
            raise IntegrityError(msg)
        key, value = tensors["key"], tensors["value"]
        label, eps, module = str(meta["label"]), float(meta["eps_init"]), str(meta["module"])
    except IntegrityError:
        raise
    except Exception as exc:  # json, safetensors or a missing field
        msg = f"serialised GRACE item is corrupt: {exc}"
        raise IntegrityError(msg) from exc
    if device is not None:
        key, value = key.to(device), value.to(device)
    return Item(key=key, value=value, label=label, eps_init=eps, module=module)


def items_by_module(items: Iterable[tuple[int, Item]]) -> dict[str, list[tuple[int, Item]]]:
    out: dict[str, list[tuple[int, Item]]] = {}
    for edit_id, item in items:
        out.setdefault(item.module, []).append((edit_id, item))
    return out
