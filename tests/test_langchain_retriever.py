"""The edit-memory retriever passes langchain-tests' standard retriever conformance tests
(sync, async, k in the constructor and per call) and returns only in-scope edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import RetrieversIntegrationTests

from memedit.editable import EditableModel
from memedit.integrations.langchain import EditMemoryRetriever
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory
from memedit.types import EditRequest

from .test_editable import OverlapScope


def _editable(directory: Path) -> EditableModel:
    em = EditableModel(
        memory=EditMemory.open(directory, embedder=HashingEmbedder()),
        scope=OverlapScope(),
        chat_fn=lambda m: "",
    )
    facts = [("place of death", "Berlin"), ("place of birth", "Rome"), ("employer", "ACME")]
    facts += [("spouse", "Ada"), ("occupation", "physicist")]
    em.edit(
        [
            EditRequest(prompt=f"The {r} of Leo Arons is", target_new=t, subject="Leo Arons")
            for r, t in facts
        ]
        + [EditRequest(prompt="The capital of France is", target_new="Lyon", subject="France")]
    )
    return em


@pytest.mark.asyncio  # the suite's async test needs it; its sync tests run as before
class TestEditMemoryRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memory(self, tmp_path: Path) -> None:
        self._em = _editable(tmp_path / "mem")

    @property
    def retriever_constructor(self) -> type[EditMemoryRetriever]:
        return EditMemoryRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"editable": self._em}

    @property
    def retriever_query_example(self) -> str:
        return "Where did Leo Arons die?"


def test_only_in_scope_edits_with_metadata(tmp_path: Path) -> None:
    em = _editable(tmp_path / "mem")
    docs = EditMemoryRetriever(editable=em, k=10).invoke("What is France known for?")
    assert [d.page_content for d in docs] == ["The capital of France is Lyon"]
    assert docs[0].metadata["scope"] == 1.0 and docs[0].metadata["in_scope"] is True
    assert docs[0].metadata["edit_id"] == 6 and isinstance(docs[0].metadata["score"], float)
    every = EditMemoryRetriever(editable=em, k=10, in_scope_only=False).invoke("France?")
    assert len(every) == 6 and every[0].metadata["subject"] == "France"
    em.close()
