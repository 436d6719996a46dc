"""A sequential run's chain of edits, kept on disk so an interrupted run continues it.

Sequential mode applies the first T cases batch after batch and scores every case edited so
far at each checkpoint. Before this, a resumed run re-applied the whole chain from the first
batch to reach the next unscored checkpoint; for MEMIT or AlphaEdit on a 2-core CPU that is
~20 minutes per 100 records, so a T = 500 curve could not be finished across sittings.

A wrapper strategy's chain (one that edits through ``EditableModel.edit``) is now applied to
its own edit memory under ``out/work/chain/<dataset>/<strategy>/memory`` — the edit log holds
every in-weight delta and adapter state, as ``from_pretrained`` restores them — and
``chain.json`` beside it lists the batches the chain holds (their case indices, the edit ids
they got, the edit seconds so far). It is written after a batch is applied, or, at a
checkpoint, after that checkpoint is scored. Reopening wraps the same base model over that
memory (restoring the logged edits, checked against the weights they were made on), rolls
back a batch the log holds beyond ``chain.json`` (one applied but never recorded or scored),
and the run goes on from there. :meth:`Chain.close` takes the edits off the model again
(``EditableModel.detach``: deltas reverted bit for bit, adapters deactivated) and leaves the
log on disk. Deleting the directory starts the chain over.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.errors import MemeditError

if TYPE_CHECKING:
    from memedit.editable import EditableModel

__all__ = ["Chain", "ChainError"]

log = logging.getLogger(__name__)

FILE = "chain.json"
FORMAT = 1


class ChainError(MemeditError):
    """A kept chain does not match the run that tries to continue it."""


@dataclass
class Chain:
    """The chain kept in ``directory`` and the wrapper ``em`` it is applied through."""

    directory: Path
    em: EditableModel
    batches: list[list[int]] = field(default_factory=list)
    edit_ids: list[list[int]] = field(default_factory=list)
    edit_s: float = 0.0

    @classmethod
    def open(cls, directory: Path, base: EditableModel) -> Chain:
        """Wrap ``base``'s model (unedited) over the chain's memory in ``directory``,
        restoring the batches ``chain.json`` records (a newer one the log holds is rolled
        back)."""
        from memedit.editable import EditableModel
        from memedit.stores.memory import EditMemory

        directory.mkdir(parents=True, exist_ok=True)
        saved = _read(directory / FILE)
        memory = EditMemory.open(directory / "memory", embedder=base.memory.embedder)
        try:
            local = base.model is not None
            em = EditableModel(
                base.model if local else None,
                base.tokenizer if local else None,
                memory=memory,
                scope=base.scope,
                counterfactual=base.counterfactual,
                chat_fn=None if local else base.chat_fn,
                config=base.config,
                model_name=base.model_name,
                statistics=base.statistics,
            )
        except BaseException:
            memory.close()
            raise
        chain = cls(
            directory,
            em,
            [list(map(int, b)) for b in saved.get("batches", [])],
            [list(map(int, b)) for b in saved.get("edit_ids", [])],
            float(saved.get("edit_s", 0.0)),
        )
        try:
            chain._settle()
        except BaseException:
            em.detach()
            raise
        return chain

    def _settle(self) -> None:
        """Roll back what the log holds beyond the recorded batches; refuse any other gap."""
        recorded = [i for ids in self.edit_ids for i in ids]
        active = [r.id for r in self.em.edits()]
        if active[: len(recorded)] != recorded:
            msg = (
                f"the chain in {self.directory} holds edits {active[:8]}... but chain.json "
                f"records {recorded[:8]}...; delete the directory to start the chain over"
            )
            raise ChainError(msg)
        while len(active) > len(recorded):  # applied, never recorded: undo (newest first)
            log.info("rolling back edit %d: applied after the chain was last recorded", active[-1])
            self.em.rollback(active[-1])
            active = [r.id for r in self.em.edits()]
        if active != recorded:
            msg = f"could not bring the chain in {self.directory} back to its recorded batches"
            raise ChainError(msg)

    @property
    def cases(self) -> int:
        """How many cases the recorded batches hold."""
        return sum(len(b) for b in self.batches)

    def check(self, expected: Sequence[Sequence[int]]) -> None:
        """Refuse a chain whose batches are not the first of ``expected`` (the run's batches
        of case indices, in order)."""
        if len(self.batches) > len(expected) or any(
            list(b) != list(e) for b, e in zip(self.batches, expected, strict=False)
        ):
            msg = (
                f"the chain in {self.directory} holds batches {self.batches[:3]}... that are not "
                f"this run's first batches {[list(e) for e in expected[:3]]}...; delete the "
                "directory to start the chain over"
            )
            raise ChainError(msg)

    def record(self, cases: Sequence[int], edit_ids: Sequence[int], edit_s: float) -> None:
        """Add one applied batch (its case indices and edit ids) and the edit seconds so far."""
        self.batches.append([int(c) for c in cases])
        self.edit_ids.append([int(i) for i in edit_ids])
        self.edit_s = float(edit_s)
        data: dict[str, Any] = {
            "format": FORMAT,
            "batches": self.batches,
            "edit_ids": self.edit_ids,
            "edit_s": round(self.edit_s, 4),
        }
        path = self.directory / FILE
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)

    def close(self) -> None:
        """Take the chain's edits off the model; the chain stays on disk."""
        self.em.detach()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        msg = f"{path} is not a chain file of format {FORMAT}; delete its directory"
        raise ChainError(msg)
    return data
