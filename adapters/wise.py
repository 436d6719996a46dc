"""WISE (Wang et al., 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of
Large Language Models"): edits held in a side copy of one FFN value (down) projection, which a
router on activations consults only for in-scope inputs.

* **Side memory.** ``W_side = W_main + delta`` at the MLP output projection of a late-middle
  block (``layer_fraction`` 0.8 of the depth; the paper edits block 26 of LLaMA-2-7B's 32). The
  model's own weights are never written: the delta lives beside them and acts through hooks
  only while :meth:`WiseAdapter.active` is entered.
* **Routing** (``router``). ``"keys"`` (the default): each edit keeps *keys*, the
  activations at the input of a lower MLP output projection (``router_fraction`` 0.47 of the
  depth) at its subject's tokens (``key_tokens``), standardised by the memory's
  per-feature mean and standard deviation over generic text (`NORM_TEXTS`), less any key
  that already reaches the threshold on generic text or on the edit's own other tokens
  (``key_filter``); a token whose standardised activation has cosine
  >= ``router_threshold`` with some key (``fragment_threshold`` for a key at a fragment of a
  word) sends its row to the side memory from that token on
  (in generation, for as many decoded tokens as the longest target its group holds, then the
  model continues on its own: ``answer_window``); a row that matches no key runs bit for
  bit as on the unedited model. ``"activation"`` is the paper's rule: a token goes to the side
  memory when ``||a (W_side - W_main)||`` exceeds ``act_ratio`` times the lowest score of any
  committed edit's in-scope tokens, per token. On SmolLM2-135M that score follows the
  activation's norm, so any entity token of an unrelated question crosses the threshold
  (BENCHMARKS.md); standardised subject keys at a middle layer separate them.
* **Training** (Adam on the edit's change alone, the model frozen): the target's negative
  log-likelihood with the edit's in-scope tokens (from the subject on, also after a few
  context prefixes) routed to the side memory; the paper's margin losses on the activation
  scores (in-scope tokens above ``beta``, irrelevant tokens below ``alpha``, the gap at least
  ``gamma``), the irrelevant samples being built-in texts plus ``irrelevant_rows`` unrelated
  questions per edit from the first ``irrelevant_size`` records of ``irrelevant_dataset``'s
  *train* file (for ZsRE, MEND's Natural Questions, as the paper's; evaluation probes come from
  later records, `memedit.evaluation.unrelated`); and two protections the paper does not have,
  ``generic_weight`` x the mean ``||a change||^2`` over generic text (the key statistics of
  the layer, `memedit.intrinsic.stats`, top ``protect_rank`` directions) and ``edit_weight``
  x the same over the committed edits' in-scope activations (exact second moment), each
  relative to the main memory's output scale: a new edit then barely moves what the side
  memory answers for unrelated text and for the earlier edits. Without the second, earlier
  edits are overwritten as edits accumulate (on SmolLM2 the 1,536 activation features are far
  from orthogonal). It stops once every target token has probability >= ``stop_prob`` (and,
  with the activation router, every margin holds).
* **Knowledge sharding.** Edits go round-robin to ``shards`` shards; an edit's change is
  confined to its shard's random mask (``mask_ratio`` of the entries) and the shards are merged
  by TIES into the one side memory that is served (``side_memory.py``). Each edit is trained
  against that merged memory.
* **Groups** (``group_size``, key router only; like the paper's WISE-Retrieve). Every
  ``group_size`` edits start a fresh side memory (its own shards and merge); a routed row is
  served by the group whose keys it matched best. One memory holding hundreds of edits trades
  the earliest ones away even with ``edit_weight`` (on ZsRE: 93.7 edit accuracy after 100
  edits in one group, 97.4 in groups of 50; BENCHMARKS.md).

Rolling an edit back recomputes shards, merge, keys and threshold from the remaining edits
(exactly the previous state when it was the newest). Deviations from the paper: the key router
and the two protections above, routing from a token on (the paper scores the whole input),
and every edit merged as soon as it is committed (the paper merges once per shard round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memedit.errors import InvalidRequestError
from memedit.hooks import edit_input, edit_output_given_input

from .api import (
    AdapterError,
    NonFiniteAdapterError,
    check_hparams,
    register_adapter,
    resolve_layer,
)
from .side_memory import (
    ROUTERS,
    SideMemory,
    WiseItem,
    WiseLayout,
    item_from_bytes,
    item_to_bytes,
    norm_digest,
    standardise,
)

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
#: Generic text whose activations at the key router's module standardise it (mean, std per
#: feature); questions and statements on unrelated topics, written for this purpose.
NORM_TEXTS = (
    "The weather today is mild with a light breeze.",
    "How many legs does a spider have?",
    "Who wrote the novel discussed in class yesterday?",
    "Flour, sugar, two eggs and some butter.",
    "The train to the coast leaves every hour from platform four.",
    "What is the boiling point of water at sea level?",
    "She planted tomatoes and basil in the garden last spring.",
    "Which planet is closest to the sun?",
    "The committee will announce its decision after the holidays.",
    "In which year did the first modern Olympic Games take place?",
    "He repaired the old bicycle with parts from a friend's shop.",
    "Who painted the ceiling of the chapel in the story?",
    "The museum opens at nine and closes at five on weekdays.",
    "What language is spoken in the northern part of the country?",
    "A small bakery on the corner sells bread and pastries.",
    "How long does it take to drive across the desert?",
    "The orchestra rehearsed the symphony for three weeks.",
    "Which team won the championship two seasons ago?",
    "The river floods the valley almost every winter.",
    "What is the name of the main character in the film?",
)
#: Where the key router's keys are taken (`WiseHparams.key_tokens`).
KEY_TOKENS = ("last", "subject")
#: Context prefixes the edit is also trained after (generalisation beyond the exact prompt).
PREFIXES = ("", "Answer the question. ", "Here is a fact. ", "Q: ")
_MAX_TOKENS = 48  # irrelevant texts are cut to this many tokens


@dataclass(frozen=True)
class WiseHparams:
    """``layer``: the block whose MLP output projection gets the side memory (None:
    ``layer_fraction`` of the depth); ``shards`` / ``mask_ratio`` / ``seed``: knowledge
    sharding; ``density``: TIES trimming (1.0 keeps every trained entry); ``router``:
    ``"keys"`` or ``"activation"`` (module docstring); ``router_layer`` (None:
    ``router_fraction`` of the depth, never above ``layer``) and ``router_threshold``: the key
    router's module and cosine threshold; ``fragment_threshold``: the higher threshold of a
    key at a token the next subject token continues (the first pieces of a split word);
    ``key_tokens``: where the keys are taken, ``"subject"`` (every subject token) or
    ``"last"`` (the subject's last token only: fewer unrelated questions routed, fewer
    rephrasings too); ``key_filter``: drop the keys that
    would route text other than the subject (see `WiseAdapter._keys`); ``act_ratio``: the
    activation router's threshold as a fraction of the lowest edit score; ``alpha`` / ``beta`` /
    ``gamma``: the score margins, as fractions of the main memory's median output norm over
    the irrelevant texts' tokens (one setting fits every layer and model); ``margin_weight``:
    their weight in the loss;
    ``irrelevant_dataset`` / ``irrelevant_size`` / ``irrelevant_rows``: the unrelated
    questions added to the irrelevant samples (0 rows or size: built-in texts only);
    ``generic_weight`` / ``edit_weight``: the two protections (0 turns one off), with
    ``protect_rank`` directions of the key statistics from ``stats_tokens`` tokens;
    ``group_size``: edits per side memory with the key router (0: one memory for all);
    ``leading_subject_keys``: also key the subject as it reads when it opens the text
    ("Kanye West's child is named"; the subject encoded alone, its first token left out), which
    the prompt's own keys, taken after other words, miss (WikiData_counterfact rephrasings);
    ``answer_window``: in generation, a routed row returns to the main memory once as many
    tokens as its group's longest target have been decoded (unless a new token matches a key);
    False keeps it on the side memory to the end;
    ``prefixes``: how many of the built-in context prefixes (the bare prompt first) the edit
    is trained after (and, with the key router, keyed in); Adam with ``lr`` for at most
    ``steps`` steps, stopping once every target token has probability >= ``stop_prob``."""

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
    irrelevant_size: int = 64
    irrelevant_dataset: str = "ZsRE"
    irrelevant_rows: int = 4
    generic_weight: float = 10.0
    edit_weight: float = 100.0
    protect_rank: int = 256
    stats_tokens: int = 100_000
    router: str = "keys"
    router_layer: int | None = None
    router_fraction: float = 0.47
    router_threshold: float = 0.74
    fragment_threshold: float = 0.82
    key_tokens: str = "subject"
    key_filter: bool = True
    group_size: int = 50
    leading_subject_keys: bool = False
    answer_window: bool = True

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
            "irrelevant_size": isinstance(self.irrelevant_size, int) and self.irrelevant_size >= 0,
            "irrelevant_rows": isinstance(self.irrelevant_rows, int) and self.irrelevant_rows >= 0,
            "generic_weight": math.isfinite(self.generic_weight) and self.generic_weight >= 0.0,
            "edit_weight": math.isfinite(self.edit_weight) and self.edit_weight >= 0.0,
            "protect_rank": isinstance(self.protect_rank, int) and self.protect_rank >= 1,
            "stats_tokens": isinstance(self.stats_tokens, int) and self.stats_tokens >= 1,
            "router": self.router in ROUTERS,
            "router_layer": self.router_layer is None
            or (isinstance(self.router_layer, int) and self.router_layer >= 0),
            "router_fraction": 0.0 <= self.router_fraction <= 1.0,
            "router_threshold": -1.0 <= self.router_threshold <= 1.0,
            "fragment_threshold": -1.0 <= self.fragment_threshold <= 1.0,
            "key_tokens": self.key_tokens in KEY_TOKENS,
            "key_filter": isinstance(self.key_filter, bool),
            "group_size": isinstance(self.group_size, int) and self.group_size >= 0,
            "leading_subject_keys": isinstance(self.leading_subject_keys, bool),
            "answer_window": isinstance(self.answer_window, bool),
        }
        check_hparams("WiseHparams", self.layer, checks, self)

    def placement(self, model: nn.Module) -> dict[str, Any]:
        """Where an edit with these settings goes on ``model``: the side memory's layer and
        the key router's, defaults resolved (the router at or below the side memory)."""
        from memedit.spec import n_layers

        count = n_layers(model)
        side = resolve_layer("WiseHparams", self.layer, self.layer_fraction, count)
        layer = resolve_layer("WiseHparams", self.router_layer, self.router_fraction, count)
        if layer > side:
            msg = f"WiseHparams.router_layer ({layer}) must not be above the side memory's ({side})"
            raise InvalidRequestError(msg, field="router_layer", value=layer)
        return {"layer": side, "router_layer": layer}

    def router_module_for(self, model: nn.Module) -> str:
        """The module whose input the key router reads: an MLP output projection at or below
        the side memory's (the decision must be made before the side memory runs)."""
        from memedit.intrinsic.compute import mlp_out_name

        return mlp_out_name(model, self.placement(model)["router_layer"])

    def module_for(self, model: nn.Module) -> str:
        from memedit.intrinsic.compute import mlp_out_name
        from memedit.spec import n_layers

        count = n_layers(model)
        return mlp_out_name(
            model, resolve_layer("WiseHparams", self.layer, self.layer_fraction, count)
        )


class WiseAdapter:
    """One WISE side memory per hooked module on one model; see the module docstring."""

    hparams_type: ClassVar[type[WiseHparams]] = WiseHparams

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.memories: dict[str, SideMemory] = {}
        self._generic: dict[tuple[int, str, int, int], torch.Tensor] = {}
        self._norms: dict[str, torch.Tensor] = {}  # norm digest -> (mean, std)
        self._refs: dict[tuple[str, str, str, int], torch.Tensor] = {}  # generic text, keyed
        self._rows: dict[str, torch.Tensor] = {}  # key router: per memory, rows routed so far
        self._route: dict[str, torch.Tensor] = {}  # key router: this forward's decisions
        self._group: dict[str, torch.Tensor] = {}  # key router: each token's group (index)
        self._since: dict[str, torch.Tensor] = {}  # key router: tokens decoded since a match
        self._fresh = True  # the current forward starts new sequences (no cache)
        self._valid: torch.Tensor | None = None  # this forward's attention mask
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
                for slot in {(it.group, it.shard) for _, it in pairs}:
                    memory._rebuild(slot)
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
        from functools import partial

        with ExitStack() as stack:
            live = {m: mem for m, mem in self.memories.items() if len(mem)}
            if any(mem.layout.router == "keys" for mem in live.values()):
                stack.enter_context(self._sequences())
            for module, memory in live.items():
                memory.to(self._device())
                if memory.layout.router == "keys":
                    decide = partial(self._decide, module, memory)
                    stack.enter_context(edit_input(self.model, memory.layout.router_module, decide))
                    routed = partial(self._routed, module, memory)
                    stack.enter_context(edit_output_given_input(self.model, module, routed))
                else:
                    stack.enter_context(edit_output_given_input(self.model, module, memory.apply))
            yield self

    @contextmanager
    def _sequences(self) -> Iterator[None]:
        """A pre-hook on the model that tells the key router, before each forward, whether it
        starts new sequences (no cache, or an empty one) or continues cached ones (a
        generation step), and gives it the attention mask (padding is never routed)."""
        import torch

        def pre(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            cached = False
            for value in kwargs.values():
                length = getattr(value, "get_seq_length", None)
                if callable(length) and int(length()) > 0:
                    cached = True
            self._fresh = not cached
            mask = kwargs.get("attention_mask")
            self._valid = mask if isinstance(mask, torch.Tensor) else None

        handle = self.model.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._rows.clear()
            self._route.clear()
            self._group.clear()
            self._since.clear()
            self._fresh, self._valid = True, None

    def _decide(self, module: str, memory: SideMemory, acts: torch.Tensor) -> torch.Tensor:
        """Key router, at its module's input: a row goes to the side memory from its first
        token that matches a key on, to the group whose keys it has matched best so far. In a
        generation step it stays there while fewer tokens than its group's window (the longest
        target it holds, `SideMemory.window_of`) have been decoded since the prompt (or since
        its latest token that matched a key): every target token is predicted by the side
        memory, the text after it by the model."""
        import torch

        if acts.dim() != 3:  # an unbatched call: route nothing
            self._route.pop(module, None)
            return acts
        sims = memory.group_sims(acts)  # (batch, seq, groups)
        if self._valid is not None and self._valid.shape[0] == acts.shape[0]:
            valid = self._valid[:, -acts.shape[1] :].bool()
            sims = torch.where(valid[..., None], sims, torch.full_like(sims, -1.0))
        if sims.shape[-1] == 0:
            self._route.pop(module, None)
            return acts
        best = sims.cummax(dim=1).values  # the row's best match so far, per group
        rows = self._rows.get(module)
        shape = (best.shape[0], best.shape[2])
        going = not self._fresh and rows is not None and rows.shape == shape
        if going:
            best = torch.maximum(best, rows[:, None, :])  # type: ignore[index]
        self._rows[module] = best[:, -1, :]
        value, group = best.max(dim=-1)
        route = value >= memory.layout.router_threshold
        batch, seq = route.shape
        hit = sims.amax(dim=-1) >= memory.layout.router_threshold  # this token matches a key
        pos = torch.arange(seq, device=acts.device).expand(batch, seq)
        last = torch.where(hit, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        before = self._since.get(module)
        if going and before is not None and before.shape == (batch,):
            since = torch.where(last >= 0, pos - last, before[:, None] + pos + 1)
            route = route & (since < memory.window_of(group))
        else:  # a new prompt: its tokens are routed from the match on, decoding counts from 0
            since = torch.zeros_like(pos)
        self._since[module] = since[:, -1]
        self._route[module] = route
        self._group[module] = group
        return acts

    def _routed(
        self, module: str, memory: SideMemory, acts: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        import torch

        route, group = self._route.get(module), self._group.get(module)
        if route is None or route.shape != acts.shape[:-1]:
            route = torch.zeros(acts.shape[:-1], dtype=torch.bool, device=acts.device)
        return memory.apply(acts, out, route, group)

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
            group = _next_group(scratch, hp.group_size if layout.router == "keys" else 0)
            shard = scratch.count(group) % layout.shards
            item = self._train(tokenizer, r, hp, scratch, shard, group)
            out.append(item_to_bytes(item))
            scratch.add_many([(next_id, item_from_bytes(out[-1]))])
            next_id += 1
        return out

    def _layout(self, tokenizer: PreTrainedTokenizerBase, module: str, hp: WiseHparams) -> Any:
        """The layout of the memory these settings build, with the key router's
        standardisation: the existing memory's when it has the same settings (so a memory
        restored elsewhere keeps its own), else measured on `NORM_TEXTS`."""
        import dataclasses

        from memedit.intrinsic.compute import capture, encode, pad_right

        ids, mask = pad_right([encode(tokenizer, "a")], 0, self._device())
        inp, outp = capture(self.model, module, ids, mask)
        shape = (int(outp.shape[-1]), int(inp.shape[-1]))
        layout = WiseLayout(
            module, shape, hp.shards, hp.mask_ratio, hp.seed, hp.density, hp.act_ratio
        )
        if hp.router == "activation":
            return layout
        layout = dataclasses.replace(
            layout,
            router="keys",
            router_module=hp.router_module_for(self.model),
            router_threshold=hp.router_threshold,
        )
        memory = self.memories.get(module)
        if memory is not None and memory.norm is not None:
            same = dataclasses.replace(memory.layout, norm_digest="")
            if same == layout:
                self._norms[memory.layout.norm_digest] = memory.norm
                return memory.layout
        norm = self._norm(tokenizer, layout.router_module)
        self._norms[norm_digest(norm)] = norm
        return dataclasses.replace(layout, norm_digest=norm_digest(norm))

    def _norm(self, tokenizer: PreTrainedTokenizerBase, module: str) -> torch.Tensor:
        """(mean, std) of the router module's input features over `NORM_TEXTS` (the first
        token of each text left out: it is every sequence's attention sink)."""
        import torch

        from memedit.intrinsic.compute import capture, encode, pad_right

        seqs = [encode(tokenizer, t) for t in NORM_TEXTS]
        ids, mask = pad_right(seqs, 0, self._device())
        inp, _ = capture(self.model, module, ids, mask)
        valid = mask.bool().clone()
        valid[:, 0] = False
        acts = inp[valid].to(torch.float32)
        return torch.stack([acts.mean(0), acts.std(0).clamp(min=1e-6)]).cpu()

    def _train(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        hp: WiseHparams,
        memory: SideMemory,
        shard: int,
        group: int = 0,
    ) -> WiseItem:
        import torch

        from memedit.intrinsic.compute import (
            capture,
            encode,
            frozen,
            lookup_index,
            pad_id,
            pad_right,
            target_batch,
        )

        device = self._device()
        lay = memory.layout
        prefixes = PREFIXES[: hp.prefixes]
        pairs = [(p + request.prompt, request.target_new) for p in prefixes]
        texts = list(IRRELEVANT)
        pool = _irrelevant_pool(hp.irrelevant_dataset, hp.irrelevant_size)
        if pool and hp.irrelevant_rows:
            start = len(memory) * hp.irrelevant_rows
            texts += [pool[(start + j) % len(pool)] for j in range(hp.irrelevant_rows)]
        # The irrelevant texts never reach the side memory and the blocks below it are frozen,
        # so their activations there are fixed: taken once here, their scores are one matmul
        # per step, and only the edit's own rows run through the model while training.
        extra_ids, extra_mask = pad_right(
            [encode(tokenizer, t)[:_MAX_TOKENS] for t in texts], pad_id(tokenizer), device
        )
        with frozen(self.model):
            extra_acts, extra_out = capture(self.model, lay.module, extra_ids, extra_mask)
        extra_valid = extra_mask.bool()
        extra_acts = extra_acts[extra_valid].to(torch.float32)
        extra_norms = extra_out[extra_valid].float().norm(dim=-1)
        protect = self._protection(tokenizer, hp, memory, group)
        batch = target_batch(tokenizer, pairs, device)
        route = torch.zeros(batch.ids.shape, dtype=torch.bool, device=device)
        spans = [_subject_span(tokenizer, p, request) for p in prefixes]
        answer = 0  # the target's length in tokens: the row's decoding window
        for i, p in enumerate(prefixes):
            end = len(encode(tokenizer, f"{p}{request.prompt} {request.target_new}"))
            answer = max(answer, end - len(encode(tokenizer, f"{p}{request.prompt}")), 1)
            # the key router sends a row to the side memory from the token its key is taken at
            first = lookup_index(tokenizer, p, request)
            if lay.router == "keys":
                first = spans[i][1] if hp.key_tokens == "last" else spans[i][0]
            route[i, first:end] = True
        irrelevant = batch.mask.bool() & ~route
        keys = offsets = None
        if lay.router == "keys":
            keys, offsets = self._keys(tokenizer, hp, batch.ids, batch.mask, spans, lay, request)
        base = memory.deltas[group].flatten() if group in memory.deltas else None
        index = memory.mask(shard)
        change = torch.zeros(index.numel(), device=device, requires_grad=True)
        seen: dict[str, torch.Tensor] = {"flat": torch.zeros(lay.numel(), device=device)}

        def side(acts: torch.Tensor) -> torch.Tensor:
            total = seen["flat"] if base is None else base + seen["flat"]
            return acts.to(torch.float32) @ total.view(lay.shape).T

        def replace(acts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            added = side(acts)
            if "scale" not in seen:  # the main memory's typical output norm here
                norms = out.detach().float()[irrelevant].norm(dim=-1)
                seen["scale"] = torch.cat([norms, extra_norms]).median()
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
                seen["flat"] = torch.zeros(lay.numel(), device=device).index_put((index,), change)
                logits = run(batch.keep)
                logp = torch.log_softmax(logits.float(), dim=-1)
                token_lp = logp[batch.tgt_index, batch.tgt_token]
                score = seen["score"]
                s_extra = side(extra_acts).norm(dim=-1) / seen["scale"]
                s_in, s_out = score[route], torch.cat([score[irrelevant], s_extra])
                margin = (
                    torch.relu(s_out - hp.alpha).mean()
                    + torch.relu(hp.beta - s_in).mean()
                    + torch.relu(hp.gamma - (s_in.min() - s_out.max()))
                )
                loss = -token_lp.mean() + hp.margin_weight * margin
                if protect:
                    mat = seen["flat"].view(lay.shape)
                    for weight, factor in protect:
                        loss = loss + weight * (mat @ factor).square().sum() / seen["scale"] ** 2
                if not torch.isfinite(loss):
                    bad = float(loss.detach())
                    msg = f"WISE training of {request.prompt!r} diverged (loss {bad})"
                    raise NonFiniteAdapterError(msg)
                held = lay.router == "keys" or float(margin.detach()) == 0.0
                done = float(token_lp.detach().min()) >= log_floor and held
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
        norm = self._norms.get(lay.norm_digest) if keys is not None else None
        return WiseItem(
            lay,
            shard,
            result,
            acts,
            request.target_new.strip(),
            lay.mask_digest(shard),
            keys,
            norm,
            group,
            answer if hp.answer_window and keys is not None else 0,
            offsets,
        )

    def _keys(
        self,
        tokenizer: PreTrainedTokenizerBase,
        hp: WiseHparams,
        ids: torch.Tensor,
        mask: torch.Tensor,
        spans: list[tuple[int, int]],
        lay: WiseLayout,
        request: EditRequest,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The key router's keys of one edit and their threshold offsets (None: all 0): the
        router module's input at each of the subject's tokens (``key_tokens="subject"``) or at
        its last token only (``"last"``) in each context-prefixed prompt, standardised
        (float16, unit length). Keys at a subject's earlier tokens ("K" of a name, " Le" of
        "Leizarraga") also match fragments of other names; last-token keys route fewer
        unrelated questions but miss more rephrasings (ZsRE, T = 100: Gen 66.4 against 76.8;
        BENCHMARKS.md).

        With ``key_filter`` a key is dropped when it reaches the threshold on a token that is
        not the subject: the edit's own other tokens (relation words, target) or generic text
        (`NORM_TEXTS`, `IRRELEVANT` and the irrelevant pool). Subject spans hold tokens such
        as " of", "-", "." or the space before a number; their keys match nearly any
        question and would send it to this edit's group (on ZsRE, 100 such edits took
        rephrase accuracy from 79 to 30 and NQ locality from 98.6 to 66). When every key
        would go, the one that matches generic text least is kept.

        A key at a fragment of a word (a token the next subject token continues: " H" of
        " Harkness", " Cop" of " Coppola") is known before the rest of the word, so it stands
        for many names; it routes only at cosine >= ``fragment_threshold`` (its offset). On
        ZsRE those keys were the last unrelated NQ questions routed (BENCHMARKS.md).

        With ``leading_subject_keys`` the subject encoded alone adds its keys (from its second
        token; a one-token subject adds none), filtered and offset like the others."""
        import torch

        from memedit.intrinsic.compute import capture

        inp, _ = capture(self.model, lay.router_module, ids[: len(spans)], mask[: len(spans)])
        norm = self._norms[lay.norm_digest].to(inp.device)
        z = standardise(inp, norm)
        taken = [(b, b) for _, b in spans] if hp.key_tokens == "last" else spans
        keys = torch.cat([z[i, a : b + 1] for i, (a, b) in enumerate(taken)])
        extra = max(0.0, hp.fragment_threshold - lay.router_threshold)
        fragment = [
            t < spans[i][1] and _continues(tokenizer, int(ids[i, t]), int(ids[i, t + 1]))
            for i, (a, b) in enumerate(taken)
            for t in range(a, b + 1)
        ]
        if hp.leading_subject_keys and request.subject:
            lead = self._leading_keys(tokenizer, hp, lay, request.subject, norm)
            if lead is not None:
                keys = torch.cat([keys, lead[0].to(keys.device)])
                fragment += lead[1]
        offsets = torch.tensor([extra if f else 0.0 for f in fragment], dtype=torch.float32)
        if not hp.key_filter:
            return keys.to(torch.float16).cpu(), offsets if bool(offsets.any()) else None
        other = mask[: len(spans)].bool().clone()
        other[:, 0] = False
        for i, (a, b) in enumerate(spans):
            other[i, a : b + 1] = False
        reference = torch.cat([z[other], self._reference(tokenizer, hp, lay).to(z.device)])
        reach = (keys @ reference.T).amax(dim=-1)
        keep = reach < lay.router_threshold
        if not bool(keep.any()):
            keep = reach == reach.min()
        log.debug("WISE keys: %d of %d kept", int(keep.sum()), keys.shape[0])
        offsets = offsets[keep.cpu()]
        return keys[keep].to(torch.float16).cpu(), offsets if bool(offsets.any()) else None

    def _leading_keys(
        self,
        tokenizer: PreTrainedTokenizerBase,
        hp: WiseHparams,
        lay: WiseLayout,
        subject: str,
        norm: torch.Tensor,
    ) -> tuple[torch.Tensor, list[bool]] | None:
        """Standardised router inputs at the tokens of ``subject`` encoded alone (as it reads
        opening a text), the first token left out, with which of them are word fragments;
        None when the subject is a single token."""
        import torch

        from memedit.intrinsic.compute import capture, encode

        ids = encode(tokenizer, subject)
        if len(ids) < 2:
            return None
        batch = torch.tensor([ids], device=self._device())
        inp, _ = capture(self.model, lay.router_module, batch, torch.ones_like(batch))
        z = standardise(inp, norm.to(inp.device))[0]
        first = len(ids) - 1 if hp.key_tokens == "last" else 1
        fragment = [
            t < len(ids) - 1 and _continues(tokenizer, ids[t], ids[t + 1])
            for t in range(first, len(ids))
        ]
        return z[first:], fragment

    def _reference(
        self, tokenizer: PreTrainedTokenizerBase, hp: WiseHparams, lay: WiseLayout
    ) -> torch.Tensor:
        """Standardised router-module activations of generic text (`NORM_TEXTS`,
        `IRRELEVANT` and the irrelevant pool; first token of each left out), cached."""
        import torch

        from memedit.intrinsic.compute import capture, encode, pad_id, pad_right

        key = (lay.router_module, lay.norm_digest, hp.irrelevant_dataset, hp.irrelevant_size)
        if key not in self._refs:
            texts = [*NORM_TEXTS, *IRRELEVANT]
            texts += list(_irrelevant_pool(hp.irrelevant_dataset, hp.irrelevant_size))
            norm = self._norms[lay.norm_digest].to(self._device())
            rows = []
            for i in range(0, len(texts), 16):
                seqs = [encode(tokenizer, t)[:_MAX_TOKENS] for t in texts[i : i + 16]]
                ids, mask = pad_right(seqs, pad_id(tokenizer), self._device())
                inp, _ = capture(self.model, lay.router_module, ids, mask)
                valid = mask.bool().clone()
                valid[:, 0] = False
                rows.append(standardise(inp[valid], norm))
            self._refs[key] = torch.cat(rows)
        return self._refs[key]

    def _protection(
        self, tokenizer: PreTrainedTokenizerBase, hp: WiseHparams, memory: SideMemory, group: int
    ) -> list[tuple[float, torch.Tensor]]:
        """(weight, F) pairs whose ``||delta F||^2`` the training keeps small: F F^T
        approximates the second moment of the side memory's inputs over generic text
        (``generic_weight``; the key statistics of the layer, top ``protect_rank``
        eigenvectors) and over the committed edits' in-scope tokens (``edit_weight``; at most
        ``protect_rank`` of them, evenly spaced), each the mean of ``a a^T``."""
        import torch

        out: list[tuple[float, torch.Tensor]] = []
        device = self._device()
        if hp.generic_weight > 0:
            key = (id(self.model), memory.layout.module, hp.stats_tokens, hp.protect_rank)
            factor = self._generic.get(key)
            if factor is None:
                from memedit.intrinsic.stats import default_statistics

                layer = _layer_of(self.model, memory.layout.module)
                mom2 = default_statistics().second_moment(
                    self.model, tokenizer, layer, hp.stats_tokens
                )
                evals, evecs = torch.linalg.eigh(mom2.to(torch.float64))
                top = evals.argsort(descending=True)[: hp.protect_rank]
                factor = (evecs[:, top] * evals[top].clamp(min=0).sqrt()).to(torch.float32)
                self._generic[key] = factor
            out.append((hp.generic_weight, factor.to(device)))
        members = [it for it in memory.items.values() if it.group == group]
        if hp.edit_weight > 0 and members:
            acts = torch.cat([it.acts.to(device, torch.float64) for it in members])
            mom = acts.T @ acts / acts.shape[0]
            ridge = 1e-6 * float(mom.diagonal().mean()) + 1e-12
            eye = torch.eye(mom.shape[0], dtype=mom.dtype, device=device)
            factor = torch.linalg.cholesky(mom + ridge * eye).to(torch.float32)
            out.append((hp.edit_weight, factor))
        return out

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def _next_group(memory: SideMemory, size: int) -> int:
    """The group a new edit joins: the newest one, or a new one once it holds ``size`` edits
    (``size`` 0: always group 0)."""
    newest = max((it.group for it in memory.items.values()), default=0)
    return newest + 1 if size and memory.count(newest) >= size else newest


def _subject_span(
    tokenizer: PreTrainedTokenizerBase, prefix: str, request: EditRequest
) -> tuple[int, int]:
    """Token indices (first, last) of the subject in ``encode(prefix + prompt)``, never the
    first token (every sequence's attention sink); the prompt's last token for a request
    without a subject (or a tokenizer without character offsets: the subject's last token)."""
    from memedit.intrinsic.compute import lookup_index

    last = max(lookup_index(tokenizer, prefix, request), 1)
    if not request.subject or not getattr(tokenizer, "is_fast", False):
        return last, last
    text = prefix + request.prompt
    start = len(prefix) + request.prompt.index(request.subject)
    end = start + len(request.subject)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    first = max(hits[0], 1) if hits else last
    return min(first, last), last


def _continues(tokenizer: PreTrainedTokenizerBase, token: int, after: int) -> bool:
    """Whether token ``after`` continues the word ``token`` is in (no space or punctuation
    between them), judged on the decoded text so that any tokenizer's word marks work."""
    alone = str(tokenizer.decode([token]))
    pair = str(tokenizer.decode([token, after]))
    rest = pair[len(alone) :] if pair.startswith(alone) else pair[len(alone.strip()) :]
    return rest[:1].isalnum()


def _layer_of(model: nn.Module, module: str) -> int:
    from memedit.spec import ensure_spec

    return int(module.removeprefix(ensure_spec(model).layers + ".").split(".")[0])


_POOLS: dict[tuple[str, int], tuple[str, ...]] = {}


def _irrelevant_pool(dataset: str, n: int) -> tuple[str, ...]:
    """Unrelated questions with their answers: the locality probes of the first ``n`` records
    of ``dataset``'s *train* file (for ZsRE, MEND's NQ questions, the paper's irrelevant
    samples); empty (logged) when the file is missing."""
    if n == 0:
        return ()
    if (dataset, n) not in _POOLS:
        from memedit.datasets import load_requests
        from memedit.errors import MemeditError

        try:
            records = load_requests(dataset, split="train", limit=n)
        except (MemeditError, OSError) as exc:
            log.warning("WISE: no %s train file (%s); built-in irrelevant texts only", dataset, exc)
            records = []
        texts = [
            f"{p.prompt} {p.answers[0] if p.answers else ''}".strip()
            for r in records
            for p in r.locality
        ]
        _POOLS[(dataset, n)] = tuple(texts)
    return _POOLS[(dataset, n)]


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
