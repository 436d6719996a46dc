"""`EditableModel`: the inference wrapper that answers every query with the current edits.

A query first retrieves the top-k edits from the edit memory, the scope classifier scores
each (query, edit) pair, and

* in scope → the counterfactual path answers (the edits in context, with its own trained
  weights active only for this call);
* out of scope → the model answers exactly as it would unwrapped.

The decision (candidates, their scores, the threshold, the edits used) comes back with every
answer so the caller can log it. A black-box ``chat(messages) -> str`` callable can be wrapped
the same way; it can only use the ``memory`` strategy.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError, MemeditError
from memedit.generation import (
    GreedyStream,
    LockLike,
    chat_text,
    check_messages,
    greedy_generate,
)
from memedit.types import (
    DEFAULT_WEIGHTS_METHOD,
    STRATEGIES,
    Answer,
    EditRecord,
    EditRequest,
    Hit,
    ScopeDecision,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from memedit.adapter_edits import AdapterEdits
    from memedit.counterfactual import CounterfactualPath
    from memedit.intrinsic import KeyStatistics, WeightDelta
    from memedit.scope import ScopeClassifier
    from memedit.stores.log import EditPage
    from memedit.stores.memory import EditMemory

log = logging.getLogger(__name__)

ChatFn = Callable[[list[dict[str, str]]], str]

MANIFEST = "memedit.json"
FORMAT_VERSION = 1


class UnsupportedStrategyError(MemeditError, ValueError):
    """The requested edit strategy is unknown or not available for this wrapped model."""


@dataclass(frozen=True)
class RouterConfig:
    """How queries are routed. ``threshold`` None means the scope classifier's own."""

    k: int = 5
    threshold: float | None = None
    max_context_edits: int = 3
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        for name in ("k", "max_context_edits", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                msg = f"RouterConfig.{name} must be a positive integer, got {value!r}"
                raise InvalidRequestError(msg, field=name, value=value)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            msg = f"RouterConfig.threshold must lie in [0, 1], got {self.threshold!r}"
            raise InvalidRequestError(msg, field="threshold", value=self.threshold)


def _as_requests(requests: object) -> list[EditRequest]:
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if not isinstance(requests, Sequence) or isinstance(requests, str):
        msg = f"edit() takes an EditRequest or a list of them, got {type(requests).__name__}"
        raise InvalidRequestError(msg, field="requests", value=requests)
    if not requests:
        msg = "edit() got an empty list of requests"
        raise InvalidRequestError(msg, field="requests", value=requests)
    out: list[EditRequest] = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, Mapping):
            try:
                out.append(EditRequest.from_dict(r))
            except InvalidRequestError as exc:
                msg = f"requests[{i}]: {exc}"
                raise InvalidRequestError(msg, field=exc.field, value=exc.value) from exc
        else:
            msg = f"requests[{i}] must be an EditRequest or a mapping, got {type(r).__name__}"
            raise InvalidRequestError(msg, field=f"requests[{i}]", value=r)
    return out


class EditableModel:
    """A language model (or black-box chat function) that answers with its edits applied."""

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        memory: EditMemory,
        scope: ScopeClassifier,
        counterfactual: CounterfactualPath | None = None,
        chat_fn: ChatFn | None = None,
        config: RouterConfig | None = None,
        model_name: str | None = None,
        statistics: KeyStatistics | None = None,
    ) -> None:
        local = model is not None or tokenizer is not None
        if local and chat_fn is not None:
            msg = "pass either (model, tokenizer) or chat_fn, not both"
            raise InvalidRequestError(msg, field="chat_fn", value=chat_fn)
        if local and (model is None or tokenizer is None):
            msg = "a local model needs both model and tokenizer"
            raise InvalidRequestError(msg, field="tokenizer" if model else "model", value=None)
        if not local and chat_fn is None:
            msg = "nothing to wrap: pass (model, tokenizer) or a chat_fn(messages) -> str"
            raise InvalidRequestError(msg, field="model", value=None)
        if local and counterfactual is None:
            from memedit.counterfactual import default_counterfactual_path

            assert model is not None and tokenizer is not None
            counterfactual = default_counterfactual_path(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.chat_fn = chat_fn
        self.memory = memory
        self.scope = scope
        self.counterfactual = counterfactual
        self.config = config or RouterConfig()
        self.model_name = model_name or (
            str(getattr(model.config, "_name_or_path", "")) if model is not None else ""
        )
        # where in-weight methods get key statistics (None: memedit.intrinsic's default)
        self.statistics = statistics
        self._deltas: dict[str, WeightDelta] = {}  # batch id -> its applied in-weight delta
        # per in-weight method with a sequential state (AlphaEdit): the state of this model's
        # sequence, in this process (a reopened memory starts a new sequence)
        self._method_states: dict[str, Any] = {}
        self._restore_weights()
        # the adapter strategy's edits (memedit.adapters), restored from the log's payloads
        self._adapter_edits: AdapterEdits | None = None
        self._restore_adapters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        memory: str | Path | None = None,
        url: str | None = None,
        config: RouterConfig | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> EditableModel:
        """Load a catalogue model, local directory or hub id (default: the embedded default)
        with an edit memory at `memory` (a directory; in-memory if None) or SQL `url`."""
        from memedit.counterfactual import default_counterfactual_path
        from memedit.models import DEFAULT_MODEL, load_model
        from memedit.scope import load_scope_classifier
        from memedit.stores.memory import EditMemory

        name = str(model) if model is not None else DEFAULT_MODEL
        lm, tok = load_model(name, device=device)
        mem = EditMemory.open(memory, url=url)
        try:
            scope = load_scope_classifier(progress=progress)
            cf = default_counterfactual_path(lm, tok, progress=progress)
            return cls(
                lm, tok, memory=mem, scope=scope, counterfactual=cf, config=config, model_name=name
            )
        except BaseException:
            mem.close()
            raise

    @classmethod
    def wrap_chat(
        cls,
        chat_fn: ChatFn,
        *,
        memory: str | Path | None = None,
        url: str | None = None,
        config: RouterConfig | None = None,
        progress: bool = True,
    ) -> EditableModel:
        """Wrap a black-box ``chat(messages) -> str`` (e.g. an OpenAI-compatible client)."""
        from memedit.scope import load_scope_classifier
        from memedit.stores.memory import EditMemory

        mem = EditMemory.open(memory, url=url)
        try:
            scope = load_scope_classifier(progress=progress)
            return cls(memory=mem, scope=scope, chat_fn=chat_fn, config=config)
        except BaseException:
            mem.close()
            raise

    # ------------------------------------------------------------------ edits
    @property
    def strategies(self) -> tuple[str, ...]:
        """Strategies this wrapped model supports now."""
        return ("memory",) if self.model is None else ("memory", "adapter", "weights")

    def edit(
        self,
        requests: EditRequest | Mapping[str, Any] | Sequence[EditRequest | Mapping[str, Any]],
        *,
        strategy: str = "memory",
        method: str | None = None,
        hparams: Any = None,
        **options: Any,
    ) -> list[EditRecord]:
        """Apply edits; all land (log, index, weights) or none do. Returns one record per
        request.

        ``strategy="memory"`` (default) stores them for retrieval. ``strategy="weights"``
        writes them into the model's weights with ``method`` (``rome`` by default; see
        ``memedit.intrinsic.method_names()``), its hyperparameters given as ``hparams`` (the
        method's dataclass or a mapping) or as keyword options (``layers=(4,)``); the whole
        batch is one reversible delta, logged with the edits so a reopened memory restores it.
        ``strategy="adapter"`` trains one adapter edit per request with ``method`` (``grace``
        by default; see ``memedit.adapters.adapter_names()``), logged with its trained state
        and rolled back one by one.
        """
        if strategy not in STRATEGIES:
            msg = f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}"
            raise UnsupportedStrategyError(msg)
        if strategy not in self.strategies:
            what = "a black-box chat model" if self.model is None else "this model yet"
            msg = (
                f"strategy {strategy!r} is not available for {what}; "
                f"available: {list(self.strategies)}"
            )
            raise UnsupportedStrategyError(msg)
        reqs = _as_requests(requests)
        if strategy == "weights":
            return self._edit_weights(reqs, method or DEFAULT_WEIGHTS_METHOD, hparams, options)
        if strategy == "adapter":
            assert self._adapter_edits is not None
            return self._adapter_edits.edit(self.memory, reqs, method, hparams, options)
        if method not in (None, "memory") or hparams is not None or options:
            given = {"method": method, "hparams": hparams, **options}
            extra = sorted(k for k, v in given.items() if v is not None and v != "memory")
            msg = f"the memory strategy takes no method or hyperparameters; got {extra}"
            raise InvalidRequestError(msg, field=extra[0], value=given[extra[0]])
        records = self.memory.add(reqs, strategy="memory", method="memory")
        prepare = getattr(self.scope, "prepare", None)
        if callable(prepare):  # precompute the edits' side of the scope features now
            prepare(reqs)
        log.info("applied %d edit(s) through the memory strategy", len(records))
        return records

    def _edit_weights(
        self, reqs: list[EditRequest], method: str, hparams: Any, options: Mapping[str, Any]
    ) -> list[EditRecord]:
        from memedit.intrinsic import apply_edit, get_method

        assert self.model is not None and self.tokenizer is not None
        if hparams is not None and options:
            msg = f"give hyperparameters as hparams= or as options, not both: {sorted(options)}"
            raise InvalidRequestError(msg, field="hparams", value=hparams)
        # a method with a sequential state (AlphaEdit's preserved keys) continues this model's
        state_type = get_method(method).state
        state = before = None
        if state_type is not None:
            state = self._method_states.setdefault(method, state_type())
            before = state.copy()
        delta = apply_edit(
            method,
            self.model,
            self.tokenizer,
            reqs,
            hparams or dict(options) or None,
            stats=self.statistics,
            state=state,
        )
        try:
            blob = delta.to_bytes()
            payloads: list[bytes | None] = [blob] + [None] * (len(reqs) - 1)
            records = self.memory.add(reqs, strategy="weights", method=method, payloads=payloads)
        except BaseException:
            delta.revert(force=True)
            if before is not None:
                self._method_states[method] = before
            raise
        self._deltas[records[0].batch_id] = delta
        log.info("applied %d edit(s) in the weights with %s", len(records), method)
        return records

    def rollback(self, edit_id: int) -> EditRecord:
        """Undo one edit: it no longer influences any answer. Returns its record.

        An in-weight edit is undone with the whole batch it was applied in (one delta), and
        only when no later in-weight batch is still active (roll those back first): the
        weights are then restored bit for bit."""
        record = self.memory.get(edit_id)
        if record.strategy == "adapter" and record.active and self._adapter_edits is not None:
            return self._adapter_edits.rollback(self.memory, record)
        if record.strategy != "weights" or not record.active:
            return self.memory.remove(edit_id)
        active = [r for r in self.memory.list() if r.strategy == "weights"]
        batch = [r.id for r in active if r.batch_id == record.batch_id]
        later = sorted({r.batch_id: r.id for r in active if r.id > max(batch)}.values())
        if later:
            msg = (
                f"edit {edit_id} is in the model's weights under later in-weight edits "
                f"{later}; roll those back first (newest first)"
            )
            raise InvalidRequestError(msg, field="edit_id", value=edit_id)
        delta = self._deltas.get(record.batch_id)
        if delta is None or not delta.applied:
            msg = f"the weights of edit {edit_id} are not applied to this model; cannot revert them"
            raise MemeditError(msg)
        delta.revert()
        try:
            records = self.memory.remove_many(batch)
        except BaseException:
            assert self.model is not None
            delta.apply_to(self.model, check_digest=False)
            raise
        del self._deltas[record.batch_id]
        self._rebuild_states({delta.method})  # the batch's keys no longer need preserving
        return records[batch.index(edit_id)]

    def _restore_weights(self) -> None:
        """Re-apply the logged in-weight edits (oldest first) to a freshly loaded model; each
        delta checks that it lands on the exact weights it was made on."""
        from memedit.intrinsic import WeightDelta

        batches: dict[str, int] = {}
        for r in self.memory.list():
            if r.strategy == "weights":
                batches.setdefault(r.batch_id, r.id)
        if not batches:
            return
        if self.model is None:
            msg = (
                f"this edit memory holds {len(batches)} in-weight edit batch(es), which need a "
                "local model; a black-box chat function cannot apply them"
            )
            raise UnsupportedStrategyError(msg)
        saved: list[tuple[str, WeightDelta]] = []
        for batch_id, first in sorted(batches.items(), key=lambda kv: kv[1]):
            blob = self.memory.payload(first)
            if blob is None:
                msg = f"in-weight edit {first} has no stored weights in the edit log"
                raise MemeditError(msg)
            saved.append((batch_id, WeightDelta.from_bytes(blob)))
        self._pin_base(saved)
        for batch_id, delta in saved:
            self._deltas[batch_id] = delta.apply_to(self.model)
        self._rebuild_states({d.method for _, d in saved})
        log.info("restored %d in-weight edit batch(es) from the edit log", len(batches))

    def _restore_adapters(self) -> None:
        """Re-activate the logged adapter edits (a local model only)."""
        from memedit.adapter_edits import AdapterEdits, logged_adapter_edits

        if self.model is None or self.tokenizer is None:
            count = logged_adapter_edits(self.memory)
            if count:
                msg = (
                    f"this edit memory holds {count} adapter edit(s), which need a local "
                    "model; a black-box chat function cannot apply them"
                )
                raise UnsupportedStrategyError(msg)
            return
        self._adapter_edits = AdapterEdits(self.model, self.tokenizer)
        restored = self._adapter_edits.restore(self.memory)
        if restored:
            log.info("restored %d adapter edit(s) from the edit log", restored)

    def adapted(self) -> AbstractContextManager[Any]:
        """Context in which ``self.model`` runs with its adapter edits (the wrapper's own
        answers always do; this is for calling the model directly)."""
        if self._adapter_edits is None:
            return nullcontext()
        return self._adapter_edits.active()

    def _pin_base(self, saved: list[tuple[str, WeightDelta]]) -> None:
        """Before re-applying saved deltas: later edits read the key statistics and context
        prefixes of the unedited weights, as the process that made the first edit did."""
        from memedit.intrinsic.values import context_prefixes

        assert self.model is not None and self.tokenizer is not None
        stats = self._statistics()
        prefixes: set[tuple[int, int, int]] = set()
        for _, delta in saved:
            hp = delta.hparams
            tokens = hp.get("stats_tokens")
            for layer in delta.layers if isinstance(tokens, int) else ():
                stats.pin_cached(self.model, layer, tokens)
            key = (hp.get("n_prefixes"), hp.get("prefix_tokens"), hp.get("prefix_seed"))
            if all(isinstance(x, int) for x in key):
                prefixes.add(key)
        for n, length, seed in sorted(prefixes):
            context_prefixes(self.model, self.tokenizer, n, length, seed)

    def _statistics(self) -> KeyStatistics:
        from memedit.intrinsic import default_statistics

        return self.statistics if self.statistics is not None else default_statistics()

    def _rebuild_states(self, methods: set[str]) -> None:
        """A sequential method's state (AlphaEdit's preserved keys) from the applied deltas."""
        from memedit.intrinsic import get_method

        for method in sorted(methods):
            state_type = get_method(method).state
            rebuild = getattr(state_type, "from_deltas", None)
            if rebuild is None:
                continue
            mine = [d for d in self._deltas.values() if d.method == method]  # oldest first
            self._method_states[method] = rebuild(mine)

    def edits(self, *, include_rolled_back: bool = False) -> list[EditRecord]:
        """The applied edits (active only, unless asked)."""
        return self.memory.list(include_rolled_back=include_rolled_back)

    def query(
        self,
        *,
        status: str = "active",
        subject: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> EditPage:
        """One page of the applied edits, filtered in the edit log's database
        (`EditMemory.query`): ``(total, records)``."""
        return self.memory.query(status=status, subject=subject, limit=limit, offset=offset)

    # ------------------------------------------------------------------ routing
    @property
    def threshold(self) -> float:
        t = self.config.threshold
        return float(self.scope.threshold if t is None else t)

    def route(self, query: str) -> ScopeDecision:
        """Retrieve candidate edits for `query` and decide whether it is in their scope."""
        if not isinstance(query, str) or not query.strip():
            msg = f"query must be a non-empty string, got {query!r:.80}"
            raise InvalidRequestError(msg, field="query", value=query)
        hits: list[Hit] = self._retrieve(query) if len(self.memory) else []
        if not hits:
            return ScopeDecision(query=query, in_scope=False, threshold=self.threshold)
        scores = [float(s) for s in self.scope.score(query, [h.record.request for h in hits])]
        # a query that repeats an edit's own prompt is in its scope whatever the classifier
        # says (rephrasings stored with a request are evaluation probes, not used here)
        asked = _normalised(query)
        scores = [
            1.0 if asked == _normalised(h.record.request.prompt) else s
            for h, s in zip(hits, scores, strict=True)
        ]
        ranked = sorted(
            (i for i, s in enumerate(scores) if s >= self.threshold), key=lambda i: -scores[i]
        )
        used = tuple(hits[i].record.id for i in ranked[: self.config.max_context_edits])
        return ScopeDecision(
            query=query,
            in_scope=bool(used),
            threshold=self.threshold,
            candidates=tuple(hits),
            scores=tuple(scores),
            used_edit_ids=used,
        )

    def _retrieve(self, query: str) -> list[Hit]:
        """Top-k edits for `query`. When the scope classifier encodes queries with the very
        embedding model the memory uses, its vector is reused: one encoder pass per query."""
        embed = getattr(self.scope, "sentence_embedding", None)
        if callable(embed) and getattr(self.scope, "embedder_name", None) == getattr(
            self.memory.embedder, "name", None
        ):
            vector = embed(query)
            if vector is not None:
                import numpy as np

                batch = np.asarray(vector, dtype=np.float32).reshape(1, -1)
                return self.memory.search_vectors(batch, self.config.k)[0]
        return self.memory.search(query, k=self.config.k)

    def used_requests(self, decision: ScopeDecision) -> list[EditRequest]:
        """The edits a decision puts in context (none when it is out of scope)."""
        return self._used_requests(decision) if decision.in_scope else []

    def _used_requests(self, decision: ScopeDecision) -> list[EditRequest]:
        by_id = {h.record.id: h.record.request for h in decision.candidates}
        return [by_id[i] for i in decision.used_edit_ids]

    def model_input(self, query: str) -> tuple[str, ScopeDecision]:
        """The exact text the local model is run on for `query`, and the decision behind it."""
        self._need_local("model_input")
        assert self.tokenizer is not None and self.counterfactual is not None
        decision = self.route(query)
        if not decision.in_scope:
            return query, decision
        text = self.counterfactual.build_input(query, self._used_requests(decision), self.tokenizer)
        return text, decision

    def activated(self, decision: ScopeDecision) -> AbstractContextManager[Any]:
        """Context in which the model runs for this decision (the counterfactual path's
        weights are active only for in-scope queries; adapter edits for every query)."""
        if decision.in_scope and self.counterfactual is not None and self.model is not None:
            if self._adapter_edits is not None and len(self._adapter_edits):
                return _stacked(
                    self._adapter_edits.active(), self.counterfactual.activate(self.model)
                )
            return self.counterfactual.activate(self.model)
        return self.adapted()

    # ------------------------------------------------------------------ answering
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        top_k: int | None = None,
        first_line: bool | None = None,
        stop_at_eos: bool = True,
    ) -> Answer:
        """Complete `prompt` (raw text, no chat template) with the edits applied: greedy, or
        top-k sampling when ``top_k`` is given (local models only). In-scope answers stop at
        their first line when the counterfactual path answers in a Q/A frame; ``first_line``
        overrides that (False: the full continuation, e.g. for Fluency). ``stop_at_eos=False``
        generates all ``max_new_tokens`` tokens, past any end-of-sequence token."""
        n = max_new_tokens or self.config.max_new_tokens
        if self.model is None:
            return self.chat([{"role": "user", "content": prompt}], max_new_tokens=n)
        assert self.tokenizer is not None
        text, decision = self.model_input(prompt)
        cut = decision.in_scope and getattr(self.counterfactual, "single_line_answers", False)
        if first_line is not None:
            cut = decision.in_scope and first_line
        with self.activated(decision):
            out = greedy_generate(
                self.model,
                self.tokenizer,
                text,
                max_new_tokens=n,
                top_k=top_k,
                first_line=cut,
                stop_at_eos=stop_at_eos,
            )
        if cut:
            out = _first_line_of(out)
        return Answer(text=out, decision=decision, prompt=text)

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        until_answer_line: bool = False,
    ) -> list[Answer]:
        """`generate` for many prompts at once (greedy): each is routed on its own, then the
        out-of-scope and the in-scope ones run as left-padded batches. ``max_new_tokens`` may
        be one value or one per prompt. ``until_answer_line``: each answer stops once the line
        that `memedit.metrics_generation.answer_matches` judges against its prompt is complete
        (the text after it is not generated; judging it gives the same verdict)."""
        from memedit.generation import batch_generate

        self._need_local("batched generation")
        assert self.model is not None and self.tokenizer is not None
        n = max_new_tokens or self.config.max_new_tokens
        budgets = [n] * len(prompts) if isinstance(n, int) else list(n)
        if len(budgets) != len(prompts):
            msg = f"{len(prompts)} prompts but {len(budgets)} max_new_tokens values"
            raise InvalidRequestError(msg, field="max_new_tokens", value=len(budgets))
        routed = [self.model_input(p) for p in prompts]
        single = getattr(self.counterfactual, "single_line_answers", False)
        texts: list[str] = [""] * len(prompts)
        for in_scope in (False, True):
            idx = [i for i, (_, d) in enumerate(routed) if d.in_scope == in_scope]
            if not idx:
                continue
            with self.activated(routed[idx[0]][1]):
                outs = batch_generate(
                    self.model,
                    self.tokenizer,
                    [routed[i][0] for i in idx],
                    max_new_tokens=[budgets[i] for i in idx],
                    first_line=in_scope and single,
                    answer_prompts=[prompts[i] for i in idx] if until_answer_line else None,
                )
            for i, o in zip(idx, outs, strict=True):
                texts[i] = o
        return [
            Answer(text=_first_line_of(t) if d.in_scope and single else t, decision=d, prompt=inp)
            for t, (inp, d) in zip(texts, routed, strict=True)
        ]

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_new_tokens: int | None = None,
        decision: ScopeDecision | None = None,
    ) -> Answer:
        """Answer the last user message of a transcript with the edits applied. `decision`:
        one already made for that message by `route` (a server routes under its memory lock,
        then generates under its model lock)."""
        msgs = check_messages(messages)
        if decision is None:
            decision = self.route(msgs[-1]["content"])
        if self.model is None:
            assert self.chat_fn is not None
            sent, decision = self.context_messages(msgs, decision=decision)
            reply = self.chat_fn(sent)
            if not isinstance(reply, str):
                msg = f"the wrapped chat function returned {type(reply).__name__}, not str"
                raise MemeditError(msg)
            return Answer(text=reply, decision=decision, prompt=json.dumps(sent))
        assert self.tokenizer is not None and self.counterfactual is not None
        edits = self.used_requests(decision)
        n = max_new_tokens or self.config.max_new_tokens
        if edits:
            text = self.counterfactual.build_chat_input(msgs, edits, self.tokenizer)
        else:
            text = chat_text(self.tokenizer, msgs)
        with self.activated(decision):
            out = greedy_generate(
                self.model, self.tokenizer, text, max_new_tokens=n, add_special_tokens=False
            )
        return Answer(text=out.strip(), decision=decision, prompt=text)

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_new_tokens: int | None = None,
        decision: ScopeDecision | None = None,
        stop: Sequence[str] | None = None,
        lock: LockLike | None = None,
    ) -> GreedyStream:
        """`chat` handed out as it is generated (local models only): iterate the returned
        stream for text deltas that add up to `chat`'s answer, cut at the first of `stop`
        (as `cut_at_stop` cuts it). The scope decision is taken once, now (or passed in), and
        kept as the stream's ``decision``. Generation starts at the first ``next`` and holds
        `lock` (a `threading.Lock`, e.g. a server's model lock) while it runs; close a stream
        that is not read to its end (`GreedyStream`)."""
        self._need_local("streaming")
        assert self.tokenizer is not None and self.counterfactual is not None
        assert self.model is not None
        msgs = check_messages(messages)
        if decision is None:
            decision = self.route(msgs[-1]["content"])
        edits = self.used_requests(decision)
        if edits:  # the same input as chat's
            text = self.counterfactual.build_chat_input(msgs, edits, self.tokenizer)
        else:
            text = chat_text(self.tokenizer, msgs)
        stream = GreedyStream(
            self.model,
            self.tokenizer,
            text,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            add_special_tokens=False,
            strip=True,
            stop=stop,
            context=lambda: self.activated(decision),
            lock=lock,
        )
        stream.decision = decision
        return stream

    def context_messages(
        self, messages: Sequence[Mapping[str, str]], *, decision: ScopeDecision | None = None
    ) -> tuple[list[dict[str, str]], ScopeDecision]:
        """What a black-box chat model is sent for `messages`: the transcript unchanged when
        its last message is out of scope, else with the edits it is about stated in a system
        message; and the decision behind it. (The memory strategy for any chat model that
        memedit cannot run itself: an upstream server, a LangChain chat model.)"""
        msgs = check_messages(messages)
        if decision is None:
            decision = self.route(msgs[-1]["content"])
        if not decision.in_scope:
            return msgs, decision
        return with_fact_context(msgs, self._used_requests(decision)), decision

    # ------------------------------------------------------------------ scoring (evaluator)
    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """KnowEdit's teacher-forced token accuracy of each target after its routed prompt."""
        from memedit.metrics import teacher_forced_accuracy

        return self.score_routed(prompts, targets, teacher_forced_accuracy)

    def predicted_tokens(self, prompts: Sequence[str], targets: Sequence[str]) -> list[list[int]]:
        """Teacher-forced argmax tokens at the target positions (for locality)."""
        from memedit.metrics import predicted_tokens

        return self.score_routed(prompts, targets, predicted_tokens)

    def score_routed(self, prompts: Sequence[str], targets: Sequence[str], fn: Any) -> list[Any]:
        """Apply a teacher-forced scorer ``fn(model, tokenizer, prompts, targets)`` (one of
        `memedit.metrics`) to each pair as the wrapper would answer it: in-scope prompts
        through the counterfactual path, the rest on the model as it is. One result per pair.
        """
        self._need_local("teacher-forced scoring")
        if len(prompts) != len(targets):
            msg = f"{len(prompts)} prompts but {len(targets)} targets"
            raise InvalidRequestError(msg, field="targets", value=len(targets))
        routed = [self.model_input(p) for p in prompts]
        results: list[Any] = [None] * len(prompts)
        for in_scope in (False, True):
            idx = [i for i, (_, d) in enumerate(routed) if d.in_scope == in_scope]
            if not idx:
                continue
            ctx = self.activated(routed[idx[0]][1])
            with ctx:
                vals = fn(
                    self.model,
                    self.tokenizer,
                    [routed[i][0] for i in idx],
                    [targets[i] for i in idx],
                )
            for i, v in zip(idx, vals, strict=True):
                results[i] = v
        return results

    def _need_local(self, what: str) -> None:
        if self.model is None:
            msg = f"{what} needs a local model; this EditableModel wraps a black-box chat function"
            raise UnsupportedStrategyError(msg)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a self-contained bundle: a manifest and the edit memory (log + index).
        The base model is referenced by name; in-weight edits are stored in the log as deltas
        (only the tensors they changed), and `from_pretrained` reloads the base model and
        re-applies them, checking each lands on the weights it was made on."""
        out = Path(directory)
        if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
            msg = f"{out} exists and is not a memedit bundle; choose an empty directory"
            raise InvalidRequestError(msg, field="directory", value=str(out))
        if self.model is not None and not self.model_name:
            msg = "the wrapped model has no name or path to reference; pass model_name="
            raise InvalidRequestError(msg, field="model_name", value=self.model_name)
        tmp = out.with_name(out.name + ".tmp-save")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            url = _export_memory(self.memory, tmp / "memory")
            manifest = {
                "format": FORMAT_VERSION,
                "model": self.model_name,
                "black_box": self.model is None,
                "memory_url": url,
                "embedder": self.memory.embedder.name,
                "scope": self.scope.name,
                "counterfactual": self.counterfactual.name if self.counterfactual else None,
                "router": asdict(self.config),
                "weights_batches": len(self._deltas),
                "adapter_edits": len(self._adapter_edits or ()),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        chat_fn: ChatFn | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> EditableModel:
        """Reopen a bundle written by `save_pretrained` (edits intact)."""
        path = Path(directory)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            msg = f"{path} is not a memedit bundle (no {MANIFEST})"
            raise InvalidRequestError(msg, field="directory", value=str(path))
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            found = manifest.get("format")
            msg = f"{manifest_path} has format {found!r}; expected {FORMAT_VERSION}"
            raise InvalidRequestError(msg, field="format", value=manifest.get("format"))
        config = RouterConfig(**manifest.get("router", {}))
        url = manifest.get("memory_url")
        if manifest.get("black_box"):
            if chat_fn is None:
                msg = "this bundle wraps a black-box chat model: pass chat_fn="
                raise InvalidRequestError(msg, field="chat_fn", value=None)
            return cls.wrap_chat(
                chat_fn, memory=path / "memory", url=url, config=config, progress=progress
            )
        return cls.load(
            manifest["model"],
            memory=path / "memory",
            url=url,
            config=config,
            device=device,
            progress=progress,
        )

    def close(self) -> None:
        """Flush and close the edit memory."""
        self.memory.close()

    def detach(self) -> None:
        """Take every edit's effect off the model, then close the memory; the edit log stays
        as it is.

        In-weight deltas are reverted newest first (bit for bit) and adapter edits
        deactivated, so the model is the base model again. Wrapping the same base model over
        the same memory (``EditableModel(model, tokenizer, memory=EditMemory.open(path), ...)``
        or ``from_pretrained``) restores every edit. The evaluator keeps a sequential chain of
        edits on disk this way between sittings."""
        try:
            for batch_id in reversed(list(self._deltas)):
                delta = self._deltas.pop(batch_id)
                if delta.applied:
                    delta.revert()
            self._method_states.clear()
            if self._adapter_edits is not None:
                for adapter in reversed(list(self._adapter_edits.adapters.values())):
                    for edit_id in reversed(adapter.edit_ids()):
                        if edit_id in adapter.edit_ids():  # not gone with its batch
                            adapter.remove(edit_id)
        finally:
            self.memory.close()

    def __enter__(self) -> EditableModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self.edits())


@contextmanager
def _stacked(*contexts: AbstractContextManager[Any]) -> Iterator[None]:
    """Enter the contexts in order (exited in reverse, also when entering one fails)."""
    with ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield


def _export_memory(memory: EditMemory, dest: Path) -> str | None:
    """Copy a SQLite-backed memory (log + index) into `dest`; for a server-backed log return
    its URL (the bundle then refers to the shared log and rebuilds its index from it)."""
    import sqlite3

    from memedit.stores.memory import INDEX_FILE, LOG_FILE

    memory.save()
    dest.mkdir(parents=True, exist_ok=True)
    url = str(memory.log.url)
    if not url.startswith("sqlite"):
        return url
    raw = memory.log.engine.raw_connection()  # works for a file and for an in-memory log
    try:
        src: Any = raw.driver_connection
        dst = sqlite3.connect(dest / LOG_FILE)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        raw.close()
    if memory.index_path is not None and memory.index_path.is_file():
        shutil.copy2(memory.index_path, dest / INDEX_FILE)
    return None


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def _first_line_of(text: str) -> str:
    """The answer in a Q/A frame: the continuation up to its first line break (leading
    whitespace kept, so it reads like the unwrapped model's continuation)."""
    body = text.lstrip()
    lead = text[: len(text) - len(body)].replace("\n", "")
    return lead + body.split("\n", 1)[0]


def fact_context(edits: Sequence[EditRequest]) -> str:
    """The system text that states edited facts to a black-box chat model."""
    facts = "\n".join(f"- {e.fact}" for e in edits)
    lead = "Answer using these facts, which are true and override anything you knew before:"
    return f"{lead}\n{facts}"


def with_fact_context(
    messages: list[dict[str, str]], edits: Sequence[EditRequest]
) -> list[dict[str, str]]:
    """For a black-box chat model: state the edited facts in a system message (merged into
    the transcript's own leading system message, if any)."""
    system = fact_context(edits)
    if messages and messages[0]["role"] == "system":
        merged = {"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}
        return [merged, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]
