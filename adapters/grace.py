"""GRACE (Hartvigsen et al., 2023, "Aging with GRACE"): edits as a discrete key-value codebook at
one transformer block's output, consulted only while the adapter is active.

For an edit (prompt → target_new) the key is the block's output at the prompt's last token;
its value starts as that output and is trained (Adam on the value alone, the model frozen)
until the model, with the value in place of the key at that position, predicts every token of
the target teacher-forced with probability at least ``stop_prob``. At inference every output
vector of the block is compared with the entry keys (Euclidean); one whose nearest key lies
within that entry's deferral radius is replaced by the entry's value, every other passes
through untouched. Radii grow and split as in the paper (see ``codebook.py``); the initial
radius is ``radius`` times the key's norm, so one setting fits every layer and model.

    adapter = GraceAdapter(model)
    payloads = adapter.prepare(tokenizer, [request])        # trained, not yet active
    adapter.commit([edit_id], payloads)
    with adapter.active():
        model(...)                                           # answers with the edit
    adapter.remove(edit_id)                                  # as if never made
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memedit.errors import InvalidRequestError

from .api import (
    AdapterError,
    NonFiniteAdapterError,
    check_hparams,
    register_adapter,
    resolve_layer,
)
from .codebook import Codebook, Item, item_from_bytes, item_to_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = ["GraceAdapter", "GraceHparams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraceHparams:
    """``layer``: the block whose output holds the codebook (None: ``layer_fraction`` of the
    depth); ``radius``: initial deferral radius as a fraction of the key's norm; ``steps`` /
    ``lr``: the value's Adam budget; training stops once every target token has probability
    >= ``stop_prob``."""

    layer: int | None = None
    layer_fraction: float = 0.5
    radius: float = 0.2
    steps: int = 100
    lr: float = 2.0
    stop_prob: float = 0.9

    def __post_init__(self) -> None:
        checks = {
            "layer_fraction": 0.0 <= self.layer_fraction <= 1.0,
            "radius": math.isfinite(self.radius) and self.radius >= 0.0,
            "steps": isinstance(self.steps, int) and self.steps >= 0,
            "lr": math.isfinite(self.lr) and self.lr > 0.0,
            "stop_prob": 0.0 < self.stop_prob < 1.0,
        }
        check_hparams("GraceHparams", self.layer, checks, self)

    def layer_for(self, model: nn.Module) -> int:
        from memedit.spec import n_layers

        return resolve_layer("GraceHparams", self.layer, self.layer_fraction, n_layers(model))

    def placement(self, model: nn.Module) -> dict[str, Any]:
        """Where an edit with these settings goes on ``model`` (the default layer resolved)."""
        return {"layer": self.layer_for(model)}


class GraceAdapter:
    """GRACE codebooks (one per hooked block) on one model; see the module docstring."""

    hparams_type: ClassVar[type[GraceHparams]] = GraceHparams

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.codebooks: dict[str, Codebook] = {}
        self._where: dict[int, str] = {}  # edit id -> module of its item

    # ------------------------------------------------------------------ state
    def edit_ids(self) -> list[int]:
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def item(self, edit_id: int) -> Item:
        return self.codebooks[self._where[edit_id]].items[edit_id]

    def commit(self, edit_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Activate items (all or none) under their edit ids."""
        if len(edit_ids) != len(payloads):
            msg = f"{len(edit_ids)} edit ids but {len(payloads)} payloads"
            raise InvalidRequestError(msg, field="payloads", value=len(payloads))
        device = self._device()
        items = [item_from_bytes(p, device) for p in payloads]
        for edit_id in edit_ids:
            if edit_id in self._where:
                msg = f"GRACE edit {edit_id} is already committed"
                raise InvalidRequestError(msg, field="edit_id", value=edit_id)
        for item in items:
            self.model.get_submodule(item.module)  # a bad module path fails before any change
        for edit_id, item in sorted(zip(edit_ids, items, strict=True), key=lambda p: p[0]):
            self.codebooks.setdefault(item.module, Codebook()).add(edit_id, item)
            self._where[edit_id] = item.module

    def remove(self, edit_id: int) -> None:
        module = self._where.get(edit_id)
        if module is None:
            msg = f"GRACE edit {edit_id} is not in this adapter"
            raise AdapterError(msg)
        book = self.codebooks[module]
        book.remove(edit_id)
        del self._where[edit_id]
        if not book.items:
            del self.codebooks[module]

    # ------------------------------------------------------------------ inference
    @contextmanager
    def active(self, *, skip: str | None = None) -> Iterator[GraceAdapter]:
        """Hook every codebook (but ``skip``'s) onto its block while the block runs; the hooks
        are removed on exit, also on an exception. No codebook: no hook at all."""
        from memedit.hooks import edit_output

        with ExitStack() as stack:
            for module, book in self.codebooks.items():
                if module != skip and len(book):
                    book.to(self._device())
                    stack.enter_context(edit_output(self.model, module, book.apply))
            yield self

    # ------------------------------------------------------------------ training
    def prepare(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: Any = None,
    ) -> list[bytes]:
        """Train one item per request (every request of the batch), each with the committed
        codebooks active; nothing is activated here. NonFiniteAdapterError if a value is
        NaN/Inf."""
        from memedit.intrinsic.compute import block_name
        from memedit.intrinsic.hparams import from_options

        hp = from_options(GraceHparams, hparams)
        module = block_name(self.model, hp.layer_for(self.model))
        return [item_to_bytes(self._train(tokenizer, r, hp, module)) for r in requests]

    def _train(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        hp: GraceHparams,
        module: str,
    ) -> Item:
        import torch

        from memedit.hooks import edit_output
        from memedit.intrinsic.compute import capture, encode, forward_logits, frozen, target_batch

        device = self._device()
        batch = target_batch(tokenizer, [(request.prompt, request.target_new)], device)
        pos = len(encode(tokenizer, request.prompt)) - 1
        with self.active(skip=module):
            _, out = capture(self.model, module, batch.ids, batch.mask)
        key = out[0, pos].detach().to(torch.float32)
        value = key.clone().requires_grad_(True)
        book = self.codebooks.get(module, Codebook())
        book.to(device)

        def replace(hidden: torch.Tensor) -> torch.Tensor:
            hidden = book.apply(hidden)
            keep = torch.ones((*hidden.shape[:-1], 1), dtype=hidden.dtype, device=hidden.device)
            keep[0, pos] = 0.0
            return hidden * keep + (1.0 - keep) * value.to(hidden.dtype)

        opt = torch.optim.Adam([value], lr=hp.lr)
        log_floor = math.log(hp.stop_prob)
        steps = 0
        with (
            frozen(self.model),
            self.active(skip=module),
            edit_output(self.model, module, replace),
        ):
            for steps in range(hp.steps + 1):
                logits = forward_logits(self.model, batch.ids, batch.mask, batch.keep)
                logp = torch.log_softmax(logits.float(), dim=-1)
                token_lp = logp[batch.tgt_index, batch.tgt_token]
                loss = -token_lp.mean()
                if not torch.isfinite(loss):
                    bad = float(loss.detach())
                    msg = f"GRACE training of {request.prompt!r} diverged (loss {bad})"
                    raise NonFiniteAdapterError(msg)
                if float(token_lp.detach().min()) >= log_floor or steps == hp.steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        result = value.detach()
        if not bool(torch.isfinite(result).all()):
            msg = f"GRACE value for {request.prompt!r} has NaN/Inf entries; the edit is refused"
            raise NonFiniteAdapterError(msg)
        log.debug(
            "GRACE value for %r: %d steps, loss %.4f", request.prompt, steps, float(loss.detach())
        )
        return Item(
            key=key,
            value=result,
            label=request.target_new.strip(),
            eps_init=hp.radius * float(key.norm()),
            module=module,
        )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


register_adapter("grace", GraceAdapter)
