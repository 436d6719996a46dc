"""The ``adapter`` strategy of `EditableModel`: edits held by adapters (``memedit.adapters``)
beside the weights, logged in the SQL edit log with their trained state as payload.

The log stays the source of truth: an edit is trained first, then logged with its payload, then
activated (all of it or none); a reopened memory re-activates the logged payloads in id order;
a rollback deactivates one edit and marks it in the log (or neither). Nothing here looks at a
method's name: each method is a `memedit.adapters.Adapter` found by name in its registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError, MemeditError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.adapters import Adapter
    from memedit.stores.memory import EditMemory
    from memedit.types import EditRecord, EditRequest

__all__ = ["STRATEGY", "AdapterEdits"]

log = logging.getLogger(__name__)

STRATEGY = "adapter"
DEFAULT_METHOD = "grace"


class AdapterEdits:
    """The adapters of one local model, one per method, kept in step with the edit log."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters: dict[str, Adapter] = {}

    def __len__(self) -> int:
        return sum(len(a.edit_ids()) for a in self.adapters.values())

    def adapter(self, method: str) -> Adapter:
        from memedit.adapters import get_adapter

        if method not in self.adapters:
            self.adapters[method] = get_adapter(method)(self.model)
        return self.adapters[method]

    def edit(
        self,
        memory: EditMemory,
        requests: Sequence[EditRequest],
        method: str | None,
        hparams: Any,
        options: Mapping[str, Any],
    ) -> list[EditRecord]:
        """Train every request's edit, log them with their payloads, then activate them."""
        if hparams is not None and options:
            msg = f"give hyperparameters as hparams= or as options, not both: {sorted(options)}"
            raise InvalidRequestError(msg, field="hparams", value=hparams)
        name = method or DEFAULT_METHOD
        adapter = self.adapter(name)
        # the other methods' edits are active; the adapter itself decides where its own are
        with self.active(skip=name):
            payloads = adapter.prepare(self.tokenizer, requests, hparams or dict(options) or None)
        blobs: list[bytes | None] = list(payloads)
        records = memory.add(list(requests), strategy=STRATEGY, method=name, payloads=blobs)
        try:
            adapter.commit([r.id for r in records], payloads)
        except BaseException:
            memory.remove_many([r.id for r in records])
            raise
        log.info("applied %d edit(s) through the %s adapter", len(records), name)
        return records

    def rollback(self, memory: EditMemory, record: EditRecord) -> EditRecord:
        """Deactivate one adapter edit and mark it rolled back in the log; an edit trained
        with others as one batch (``group``, e.g. a per-batch LoRA) goes with all of them."""
        adapter = self.adapters.get(record.method)
        if adapter is None or record.id not in adapter.edit_ids():
            msg = f"adapter edit {record.id} ({record.method}) is not active on this model"
            raise MemeditError(msg)
        group = getattr(adapter, "group", None)
        ids = list(group(record.id)) if callable(group) else [record.id]
        blobs = [memory.payload(i) for i in ids]
        adapter.remove(record.id)
        try:
            records = memory.remove_many(ids)
        except BaseException:
            if all(b is not None for b in blobs):
                adapter.commit(ids, [b for b in blobs if b is not None])
            raise
        return records[ids.index(record.id)]

    def restore(self, memory: EditMemory) -> int:
        """Activate the logged adapter edits of a freshly opened memory; how many."""
        by_method: dict[str, list[tuple[int, bytes]]] = {}
        for r in memory.list():
            if r.strategy != STRATEGY:
                continue
            blob = memory.payload(r.id)
            if blob is None:
                msg = f"adapter edit {r.id} has no stored adapter state in the edit log"
                raise MemeditError(msg)
            by_method.setdefault(r.method, []).append((r.id, blob))
        for method, items in by_method.items():
            self.adapter(method).commit([i for i, _ in items], [b for _, b in items])
        return sum(len(v) for v in by_method.values())

    @contextmanager
    def active(self, *, skip: str | None = None) -> Iterator[None]:
        """Every adapter's edits (but method ``skip``'s) active while the block runs."""
        with ExitStack() as stack:
            for name, adapter in self.adapters.items():
                if name != skip and adapter.edit_ids():
                    stack.enter_context(adapter.active())
            yield


def logged_adapter_edits(memory: EditMemory) -> int:
    """How many active adapter edits a memory's log holds."""
    return sum(1 for r in memory.list() if r.strategy == STRATEGY)
