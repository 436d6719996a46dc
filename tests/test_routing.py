"""Routing with the real scope classifier and edit memory (no language model needed): the
query is encoded once and the vector is shared with retrieval, which must not change what is
retrieved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memedit.datasets import load_requests
from memedit.editable import EditableModel

pytestmark = pytest.mark.integration


def test_shared_query_vector_retrieves_what_the_memory_would(tmp_path: Path) -> None:
    from memedit.scope import load_scope_classifier
    from memedit.stores.memory import EditMemory

    scope = load_scope_classifier(progress=False)
    memory = EditMemory.open(tmp_path / "mem")
    assert scope.embedder_name == memory.embedder.name  # so route() shares the vector
    reqs = load_requests("ZsRE", limit=40)
    with EditableModel(memory=memory, scope=scope, chat_fn=lambda m: "ok") as em:
        em.edit(reqs)
        queries = [r.rephrase[0] for r in reqs[:20]] + [r.locality[0].prompt for r in reqs[:20]]
        for q in queries:
            shared = scope.sentence_embedding(q)
            assert shared is not None
            own = memory.embedder.encode([q])[0]
            assert float(np.dot(shared, own)) > 0.99999
            routed = [h.record.id for h in em.route(q).candidates]
            direct = [h.record.id for h in memory.search(q, k=em.config.k)]
            assert routed[:3] == direct[:3]
        rephrased = em.route(reqs[0].rephrase[0])
        assert rephrased.in_scope and rephrased.used_edit_ids[0] == 1
