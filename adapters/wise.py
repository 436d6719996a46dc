"""WISE (Wang et al., 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of
Large Language Models"): edits held in a side copy of one FFN value (down) projection, which a
router on activations consults only for in-scope inputs.

* **Side memory.** ``W_side = W_main + delta`` at the MLP output projection of a late-middle
  block (``layer_fraction`` 0.8 of the depth; the paper edits block 26 of LLaMA-2-7B's 32). The
  model's own weights are never written: the delta lives beside them and acts through hooks
  only while :meth:`WiseAdapter.active` is entered.
* **Routing.** A token's activation score is ``||a (W_side - W_main)||`` with ``a`` the
  projection's input at that token. Tokens scoring above the threshold (``act_ratio`` times the
  lowest score of any committed edit's in-scope tokens) are answered by the side memory, every
  other token by the main memory; per token, so it needs no state across generation steps.
* **Training** (Adam on the edit's change alone, the model frozen): the target's negative
  log-likelihood with the edit's in-scope tokens (from the subject's last token on, also after
  a few context prefixes) routed to the side memory, plus the paper's margin losses on the
  activation scores: in-scope tokens above ``beta``, irrelevant tokens (built-in unrelated
  texts and the tokens before the subject) below ``alpha``, and the gap between the two at
  least ``gamma``. It stops once every target token has probability >= ``stop_prob`` and every
  margin holds.
* **Knowledge sharding.** Edits go round-robin to ``shards`` shards; an edit's change is
  confined to its shard's random mask (``mask_ratio`` of the entries) and the shards are merged
  by TIES into the one side memory that is served (``side_memory.py``). Each edit is trained
  against that merged memory, so what it learned is what is served.

Rolling an edit back recomputes shards, merge and threshold from the remaining edits (exactly
the previous state when it was the newest). Deviations from the paper: routing is per token
(the paper scores the whole input), every edit is merged as soon as it is committed (the paper
merges once per shard round), and the irrelevant samples are a fixed built-in set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError
from memedit.hooks import edit_output_given_input

from .api import (
    AdapterError,
    NonFiniteAdapterError,
    check_hparams,
    register_adapter,
    resolve_layer,
)
from .side_memory import SideMemory, WiseItem, WiseLayout, item_from_bytes, item_to_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = ["WiseAdapter", "WiseHparams"]

log = logging.getLogger(__name__)

#: Unrelated texts whose tokens must keep scoring low (the paper's irrelevant samples).
IRRELEVANT = (
    "The weather today is mild with a light breeze.",
    "How many legs does a spider have?",
    "Who wrote the novel discussed in class yesterday?",
    "Flour, sugar, two eggs and some butter.",
)
#: Context prefixes the edit is also trained after (generalisation beyond the exact prompt).
PREFIXES = ("", "Answer the question. ", "Here is a fact. ", "Q: ")


@dataclass(frozen=True)
class WiseHparams:
    """``layer``: the block whose MLP output projection gets the side memory (None:
    ``layer_fraction`` of the depth); ``shards`` / ``mask_ratio`` / ``seed``: knowledge
    sharding; ``density``: TIES trimming (1.0 keeps every trained entry); ``act_ratio``: the
    routing threshold as a fraction of the lowest edit score; ``alpha`` / ``beta`` /
    ``gamma``: the score margins, as fractions of the main memory's median output norm over
    the irrelevant texts' tokens (one setting fits every layer and model);
    ``margin_weight``: their weight in the loss; ``prefixes``:
    how many of the built-in context prefixes (the bare prompt first) the edit is trained
    after; Adam with ``lr`` for at most ``steps`` steps, stopping once every target token has
    probability >= ``stop_prob`` and the margins hold."""

    layer: int | None = None
    layer_fraction: float = 0.8
    shards: int = 2
    mask_ratio: float = 0.2
    seed: int = 0
    density: float = 1.0
    act_ratio: float = 0.8
    alpha: float = 0.05
    beta: float = 0.5
    gamma: float = 0.3
    margin_weight: float = 1.0
    prefixes: int = 2
    steps: int = 40
    lr: float = 0.05
    stop_prob: float = 0.9

    def __post_init__(self) -> None:
        def pos(v: float) -> bool:
            return math.isfinite(v) and v > 0.0

        checks = {
            "layer_fraction": 0.0 <= self.layer_fraction <= 1.0,
            "shards": isinstance(self.shards, int) and self.shards >= 1,
            "mask_ratio": 0.0 < self.mask_ratio <= 1.0,
            "seed": isinstance(self.seed, int) and self.seed >= 0,
            "density": 0.0 < self.density <= 1.0,
            "act_ratio": 0.0 < self.act_ratio <= 1.0,
            "alpha": math.isfinite(self.alpha) and self.alpha >= 0.0,
            "beta": pos(self.beta) and self.beta > self.alpha,
            "gamma": math.isfinite(self.gamma) and self.gamma >= 0.0,
            "margin_weight": math.isfinite(self.margin_weight) and self.margin_weight >= 0.0,
            "prefixes": isinstance(self.prefixes, int) and 1 <= self.prefixes <= len(PREFIXES),
            "steps": isinstance(self.steps, int) and self.steps >= 0,
            "lr": pos(self.lr),
            "stop_prob": 0.0 < self.stop_prob < 1.0,
        }
        check_hparams("WiseHparams", self.layer, checks, self)

    def module_for(self, model: nn.Module) -> str:
        from memedit.intrinsic.compute import mlp_out_name
        from memedit.spec import n_layers

        count = n_layers(model)
        return mlp_out_name(
            model, resolve_layer("WiseHparams", self.layer, self.layer_fraction, count)
        )


class WiseAdapter:
    """One WISE side memory per hooked module on one model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.memories: dict[str, SideMemory] = {}
        self._where: dict[int, str] = {}  # edit id -> module of its item

    # ------------------------------------------------------------------ state
    def edit_ids(self) -> list[int]:
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def item(self, edit_id: int) -> WiseItem:
        return self.memories[self._where[edit_id]].items[edit_id]

    def commit(self, edit_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Activate items (all or none) under their edit ids."""
        if len(edit_ids) != len(payloads):
            msg = f"{len(edit_ids)} edit ids but {len(payloads)} payloads"
            raise InvalidRequestError(msg, field="payloads", value=len(payloads))
        items = [item_from_bytes(p) for p in payloads]
        for edit_id in edit_ids:
            if edit_id in self._where:
                msg = f"WISE edit {edit_id} is already committed"
                raise InvalidRequestError(msg, field="edit_id", value=edit_id)
        by_module: dict[str, list[tuple[int, WiseItem]]] = {}
        for edit_id, item in zip(edit_ids, items, strict=True):
            self.model.get_submodule(item.layout.module)  # a bad path fails before any change
            by_module.setdefault(item.layout.module, []).append((edit_id, item))
        for module, pairs in by_module.items():
            old = self.memories.get(module)
            if old is not None and pairs[0][1].layout != old.layout:
                msg = (
                    f"WISE edit {pairs[0][0]} uses other settings than the side memory at {module}"
                )
                raise InvalidRequestError(msg, field="hparams", value=pairs[0][1].layout)
        for module, pairs in by_module.items():
            memory = self.memories.get(module) or SideMemory(pairs[0][1].layout)
            memory.to(self._device())
            saved = dict(memory.items)
            try:
                memory.add_many(pairs)
            except BaseException:
                memory.items = saved
                for shard in {it.shard for _, it in pairs}:
                    memory._rebuild_shard(shard)
                memory.merge()
                raise
            self.memories[module] = memory
            for edit_id, _ in pairs:
                self._where[edit_id] = module

    def remove(self, edit_id: int) -> None:
        module = self._where.get(edit_id)
        if module is None:
            msg = f"WISE edit {edit_id} is not in this adapter"
            raise AdapterError(msg)
        memory = self.memories[module]
        memory.remove(edit_id)
        del self._where[edit_id]
        if not memory.items:
            del self.memories[module]

    # ------------------------------------------------------------------ inference
    @contextmanager
    def active(self) -> Iterator[WiseAdapter]:
        """Route every hooked module's tokens between main and side memory while the block
        runs; the hooks are removed on exit, also on an exception. No edit: no hook at all."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            for module, memory in self.memories.items():
                if len(memory):
                    memory.to(self._device())
                    stack.enter_context(edit_output_given_input(self.model, module, memory.apply))
            yield self

    # ------------------------------------------------------------------ training
    def prepare(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: Any = None,
    ) -> list[bytes]:
        """Train one item per request, each on top of the committed memory and the batch's
        earlier items; nothing is activated here. NonFiniteAdapterError if a change is
        NaN/Inf."""
        from memedit.intrinsic.hparams import from_options

        hp = from_options(WiseHparams, hparams)
        module = hp.module_for(self.model)
        layout = self._layout(tokenizer, module, hp)
        memory = self.memories.get(module)
        if memory is not None and memory.layout != layout:
            msg = (
                f"the WISE side memory at {module} was built with other settings ({memory.layout})"
            )
            raise InvalidRequestError(msg, field="hparams", value=hparams)
        # a scratch copy: the batch's earlier items count for the later ones
        scratch = SideMemory(layout, device=self._device()) if memory is None else memory.copy()
        next_id = max(scratch.items, default=0) + 1
        out = []
        for r in requests:
            shard = len(scratch) % layout.shards
            item = self._train(tokenizer, r, hp, scratch, shard)
            out.append(item_to_bytes(item))
            scratch.add_many([(next_id, item_from_bytes(out[-1]))])
            next_id += 1
        return out

    def _layout(self, tokenizer: PreTrainedTokenizerBase, module: str, hp: WiseHparams) -> Any:
        from memedit.intrinsic.compute import capture, encode, pad_right

        ids, mask = pad_right([encode(tokenizer, "a")], 0, self._device())
        inp, outp = capture(self.model, module, ids, mask)
        shape = (int(outp.shape[-1]), int(inp.shape[-1]))
        return WiseLayout(
            module, shape, hp.shards, hp.mask_ratio, hp.seed, hp.density, hp.act_ratio
        )

    def _train(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        hp: WiseHparams,
        memory: SideMemory,
        shard: int,
    ) -> WiseItem:
        import torch

        from memedit.intrinsic.compute import (
            encode,
            frozen,
            lookup_index,
            target_batch,
        )

        device = self._device()
        lay = memory.layout
        prefixes = PREFIXES[: hp.prefixes]
        pairs = [(p + request.prompt, request.target_new) for p in prefixes]
        extra = [encode(tokenizer, t) for t in IRRELEVANT]
        batch = target_batch(
            tokenizer, pairs, device, extra_rows=extra, extra_keep=[0] * len(extra)
        )
        route = torch.zeros(batch.ids.shape, dtype=torch.bool, device=device)
        for i, p in enumerate(prefixes):
            end = len(encode(tokenizer, f"{p}{request.prompt} {request.target_new}"))
            route[i, lookup_index(tokenizer, p, request) : end] = True
        irrelevant = batch.mask.bool() & ~route
        base = memory.delta.flatten() if memory.delta is not None else None
        index = memory.mask(shard)
        change = torch.zeros(index.numel(), device=device, requires_grad=True)
        seen: dict[str, torch.Tensor] = {}

        def side(acts: torch.Tensor) -> torch.Tensor:
            flat = torch.zeros(lay.numel(), device=device).index_put((index,), change)
            total = flat if base is None else base + flat
            return acts.to(torch.float32) @ total.view(lay.shape).T

        def replace(acts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            added = side(acts)
            if "scale" not in seen:  # the main memory's typical output norm here
                seen["scale"] = out.detach().float()[irrelevant].norm(dim=-1).median()
            seen["score"] = added.norm(dim=-1) / seen["scale"]
            seen["acts"] = acts.detach()
            return out + (added * route[..., None]).to(out.dtype)

        opt = torch.optim.Adam([change], lr=hp.lr)
        log_floor = math.log(hp.stop_prob)
        steps, loss = 0, torch.zeros(())
        with (
            frozen(self.model),
            edit_output_given_input(self.model, lay.module, replace),
            _upper(self.model, tokenizer, lay.module, batch.ids, batch.mask) as run,
        ):
            for steps in range(hp.steps + 1):
                logits = run(batch.keep)
                logp = torch.log_softmax(logits.float(), dim=-1)
                token_lp = logp[batch.tgt_index, batch.tgt_token]
                score = seen["score"]
                s_in, s_out = score[route], score[irrelevant]
                margin = (
                    torch.relu(s_out - hp.alpha).mean()
                    + torch.relu(hp.beta - s_in).mean()
                    + torch.relu(hp.gamma - (s_in.min() - s_out.max()))
                )
                loss = -token_lp.mean() + hp.margin_weight * margin
                if not torch.isfinite(loss):
                    bad = float(loss.detach())
                    msg = f"WISE training of {request.prompt!r} diverged (loss {bad})"
                    raise NonFiniteAdapterError(msg)
                done = float(token_lp.detach().min()) >= log_floor and float(margin.detach()) == 0.0
                if done or steps == hp.steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        result = change.detach().to(torch.float16)
        if not bool(torch.isfinite(result).all()):
            msg = f"WISE change for {request.prompt!r} has NaN/Inf entries; the edit is refused"
            raise NonFiniteAdapterError(msg)
        log.debug(
            "WISE edit %r: %d steps, loss %.4f, margin %.4f, in %.2f, out %.2f",
            request.prompt,
            steps,
            float(loss.detach()),
            float(margin.detach()),
            float(s_in.detach().min()),
            float(s_out.detach().max()),
        )
        acts = seen["acts"][0][route[0]].to(torch.float32)  # the bare prompt's in-scope tokens
        return WiseItem(
            lay, shard, result, acts, request.target_new.strip(), lay.mask_digest(shard)
        )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


#: Model types whose decoder runs unchanged on a slice of its blocks fed ``inputs_embeds``
#: (no embedding scaling or position embedding added to them).
_SLICEABLE = frozenset({"llama", "mistral"})


@contextmanager
def _upper(
    model: nn.Module, tokenizer: Any, module: str, ids: torch.Tensor, mask: torch.Tensor
) -> Iterator[Any]:
    """A function ``keep -> logits at keep`` for the batch. The side memory sits in block L, so
    where the architecture allows it the blocks below L run once (their output does not change
    during training) and every step runs blocks L.. only; otherwise the whole model runs."""
    import torch
    from torch import nn

    from memedit.intrinsic.compute import capture, forward_logits
    from memedit.spec import ensure_spec

    spec = ensure_spec(model)
    blocks_path = spec.layers
    layer = int(module.removeprefix(blocks_path + ".").split(".")[0])
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    sliceable = getattr(model.config, "model_type", None) in _SLICEABLE and isinstance(
        blocks, nn.ModuleList
    )
    if not sliceable or layer == 0:
        yield lambda keep: forward_logits(model, ids, mask, keep)
        return
    hidden, _ = capture(model, f"{blocks_path}.{layer}", ids, mask)
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)

    def run(keep: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        if logits.dim() == 2:
            return logits
        return (
            logits[keep] if logits.shape[:2] == keep.shape else logits.reshape(-1, logits.shape[-1])
        )

    setattr(parent, attr, nn.ModuleList(list(blocks)[layer:]))
    try:
        yield run
    finally:
        setattr(parent, attr, blocks)


register_adapter("wise", WiseAdapter)
