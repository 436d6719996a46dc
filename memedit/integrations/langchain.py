"""LangChain components over an `EditableModel`.

* `EditMemoryRetriever` returns the edits a query is about as `Document`s (the edit as one
  sentence; ``edit_id``, retrieval ``score`` and scope probability ``scope`` in metadata).
* `ChatMemedit` is a chat model that answers with the edits applied: around any LangChain
  chat model (``llm=``, a black box: the memory strategy, edits stated in a system message
  when the last human message is in scope, streaming when it streams), or the
  `EditableModel`'s own local model (every strategy it holds; streamed token by token). Each
  answer carries the scope decision in ``response_metadata["memedit"]``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from memedit.editable import EditableModel, fact_context
from memedit.errors import InvalidRequestError
from memedit.generation import GreedyStream, cut_at_stop
from memedit.types import ScopeDecision


class EditMemoryRetriever(BaseRetriever):
    """Retrieve up to ``k`` edits for a query, best scope probability first; with
    ``in_scope_only`` (default) only those the scope classifier puts in scope."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    editable: EditableModel
    k: int = Field(default=4, ge=1)
    in_scope_only: bool = True

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k = kwargs.get("k", self.k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"k must be a positive integer, got {k!r}"
            raise InvalidRequestError(msg, field="k", value=k)
        em = self.editable
        if not len(em.memory):
            return []
        hits = em.memory.search(query, k=k)
        probs = [float(p) for p in em.scope.score(query, [h.record.request for h in hits])]
        threshold = em.threshold
        ranked = sorted(zip(hits, probs, strict=True), key=lambda hp: -hp[1])
        return [
            Document(
                page_content=h.record.request.fact,
                metadata={
                    "edit_id": h.record.id,
                    "score": h.score,
                    "scope": p,
                    "in_scope": p >= threshold,
                    "subject": h.record.request.subject,
                },
            )
            for h, p in ranked
            if p >= threshold or not self.in_scope_only
        ]


# one lock per EditableModel: its local model, scope classifier and memory answer one call at
# a time (batch/abatch run calls in threads; in-scope calls switch adapter weights on)
_LOCKS: weakref.WeakKeyDictionary[EditableModel, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(em: EditableModel) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(em, threading.Lock())


class ChatMemedit(BaseChatModel):
    """A LangChain chat model that answers with `editable`'s edits applied.

    With ``llm`` (any LangChain chat model) the wrapped model is a black box: the last human
    message is routed through the edit memory and scope classifier; out of scope the messages
    go to ``llm`` unchanged, in scope with the edits it is about stated in a system message.
    ``stream``/``astream`` stream when ``llm`` does. Without ``llm``, `editable`'s local model
    answers (``EditableModel.chat``: the counterfactual path in scope, the model with its
    in-weight edits otherwise), greedily; streamed, as it is generated
    (``EditableModel.chat_stream``: the same answer, the decision taken once up front). The
    decision rides on the first chunk of a stream. (LangChain's own ``stream`` reports each
    chunk to the callbacks.)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    editable: EditableModel
    llm: BaseChatModel | None = None
    model_name: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None  # reported for tracing; the local model decodes greedily
    stop: list[str] | None = None

    @property
    def _llm_type(self) -> str:
        return "memedit"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._name(), "black_box": self.llm is not None}

    def _name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.llm is not None:
            inner = getattr(self.llm, "model_name", None) or getattr(self.llm, "model", None)
            return str(inner or self.llm._llm_type)
        return self.editable.model_name or "memedit"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="memedit", ls_model_name=str(kwargs.get("model") or self._name())
        )
        params["ls_model_type"] = "chat"
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        n = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(n, int):
            params["ls_max_tokens"] = n
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    # ------------------------------------------------------------------ black box
    def _routed(self, messages: list[BaseMessage]) -> tuple[list[BaseMessage], ScopeDecision]:
        """The messages the wrapped chat model gets, and the decision behind them."""
        em = self.editable
        with _lock(em):
            decision = em.route(_last_human_text(messages))
            edits = em.used_requests(decision)
        if not edits:
            return messages, decision
        facts = fact_context(edits)
        if messages and isinstance(messages[0], SystemMessage):
            head = SystemMessage(f"{messages[0].text}\n\n{facts}")
            return [head, *messages[1:]], decision
        return [SystemMessage(facts), *messages], decision

    def _inner_kwargs(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        stops = stop or self.stop
        if stops:
            out["stop"] = stops
        return out

    # ------------------------------------------------------------------ local model
    def _local(self, messages: list[BaseMessage], stop: list[str] | None, n: Any) -> AIMessage:
        em = self.editable
        with _lock(em):
            answer = em.chat(_as_dicts(messages), max_new_tokens=n or self.max_tokens)
        text = cut_at_stop(answer.text, stop or self.stop)
        meta = {"memedit": answer.decision.to_dict(), "model_name": self._name()}
        return AIMessage(content=text, response_metadata=meta)

    def _local_stream(
        self, messages: list[BaseMessage], stop: list[str] | None, n: Any
    ) -> GreedyStream:
        """The local model's answer as a stream: routed now, generated (holding the same
        lock) as it is read."""
        em = self.editable
        lock = _lock(em)
        with lock:  # routing; the generation takes the lock itself when it starts
            return em.chat_stream(
                _as_dicts(messages),
                max_new_tokens=n or self.max_tokens,
                stop=stop or self.stop,
                lock=lock,
            )

    def _meta(self, stream: GreedyStream) -> dict[str, Any]:
        assert stream.decision is not None
        return {"memedit": stream.decision.to_dict(), "model_name": self._name()}

    # ------------------------------------------------------------------ LangChain API
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.llm is None:
            message = self._local(messages, stop, kwargs.get("max_tokens"))
            return ChatResult(generations=[ChatGeneration(message=message)])
        sent, decision = self._routed(messages)
        reply = self.llm.invoke(sent, **self._inner_kwargs(stop, kwargs))
        return ChatResult(generations=[ChatGeneration(message=_with_decision(reply, decision))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.llm is None:
            return await super()._agenerate(messages, stop, run_manager, **kwargs)
        import asyncio

        sent, decision = await asyncio.to_thread(self._routed, messages)
        reply = await self.llm.ainvoke(sent, **self._inner_kwargs(stop, kwargs))
        return ChatResult(generations=[ChatGeneration(message=_with_decision(reply, decision))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.llm is None:
            stream = self._local_stream(messages, stop, kwargs.get("max_tokens"))
            try:
                yield from _local_chunks(stream, self._meta(stream))
            finally:
                stream.close()
            return
        sent, decision = self._routed(messages)
        first = True
        for piece in self.llm.stream(sent, **self._inner_kwargs(stop, kwargs)):
            chunk = _chunk(piece, decision if first else None)
            first = False
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        import asyncio

        if self.llm is None:
            n = kwargs.get("max_tokens")
            stream = await asyncio.to_thread(self._local_stream, messages, stop, n)
            try:
                async for out in _alocal_chunks(stream, self._meta(stream)):
                    yield out
            finally:
                stream.cancel()  # stops a generation nobody reads; it releases the lock
            return
        sent, decision = await asyncio.to_thread(self._routed, messages)
        first = True
        async for piece in self.llm.astream(sent, **self._inner_kwargs(stop, kwargs)):
            chunk = _chunk(piece, decision if first else None)
            first = False
            yield ChatGenerationChunk(message=chunk)


def _local_chunk(text: str, meta: dict[str, Any] | None, *, last: bool) -> ChatGenerationChunk:
    chunk = AIMessageChunk(
        content=text, response_metadata=meta or {}, chunk_position="last" if last else None
    )
    return ChatGenerationChunk(message=chunk)


def _local_chunks(pieces: Iterator[str], meta: dict[str, Any]) -> Iterator[ChatGenerationChunk]:
    """A local stream's pieces as chunks: the decision on the first, the last one marked
    (at least one chunk, if empty)."""
    first: dict[str, Any] | None = meta
    previous: str | None = None
    for piece in pieces:  # each piece goes out once the next has come
        if previous is not None:
            yield _local_chunk(previous, first, last=False)
            first = None
        previous = piece
    yield _local_chunk(previous or "", first, last=True)


async def _alocal_chunks(
    pieces: AsyncIterator[str], meta: dict[str, Any]
) -> AsyncIterator[ChatGenerationChunk]:
    """`_local_chunks` for an async stream."""
    first: dict[str, Any] | None = meta
    previous: str | None = None
    async for piece in pieces:
        if previous is not None:
            yield _local_chunk(previous, first, last=False)
            first = None
        previous = piece
    yield _local_chunk(previous or "", first, last=True)


def _last_human_text(messages: Sequence[BaseMessage]) -> str:
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return m.text
    msg = "the messages hold no human message to answer"
    raise InvalidRequestError(msg, field="messages", value=[type(m).__name__ for m in messages])


_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def _as_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the local model's transcript (names are dropped)."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.type)
        if role is None:
            msg = (
                f"messages[{i}] is a {type(m).__name__}; the local model takes system, human "
                "and AI messages only"
            )
            raise InvalidRequestError(msg, field=f"messages[{i}]", value=m.type)
        out.append({"role": role, "content": m.text})
    return out


def _with_decision(reply: BaseMessage, decision: ScopeDecision) -> AIMessage:
    meta = {**reply.response_metadata, "memedit": decision.to_dict()}
    if isinstance(reply, AIMessage):
        return reply.model_copy(update={"response_metadata": meta})
    return AIMessage(content=reply.content, response_metadata=meta)


def _chunk(piece: BaseMessage, decision: ScopeDecision | None) -> AIMessageChunk:
    chunk = piece if isinstance(piece, AIMessageChunk) else AIMessageChunk(content=piece.content)
    if decision is None:
        return chunk
    meta = {**chunk.response_metadata, "memedit": decision.to_dict()}
    return chunk.model_copy(update={"response_metadata": meta})
