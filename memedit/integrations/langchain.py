"""LangChain components over an `EditableModel`'s edit memory.

`EditMemoryRetriever` returns the edits a query is about as `Document`s (the edit as one
sentence; ``edit_id``, retrieval ``score`` and scope probability ``scope`` in metadata).
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from memedit.editable import EditableModel
from memedit.errors import InvalidRequestError


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
