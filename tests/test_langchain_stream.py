"""`ChatMemedit` over a tiny random local model streams as the model generates: several
chunks that add up to `EditableModel.chat`'s answer, the decision on the first chunk, the
last one marked; a stream left early releases the model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import HumanMessage

from memedit.editable import EditableModel, RouterConfig
from memedit.generation import cut_at_stop
from memedit.integrations.langchain import ChatMemedit, _lock
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import REQ, MarkerPath, OverlapScope
from .tiny import tiny_llama

IN_SCOPE = "Where did Leo Arons die?"


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    wrapped = EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=20),
        model_name="tiny",
    )
    wrapped.edit(REQ)
    yield wrapped
    wrapped.close()


def test_local_stream_is_token_by_token_and_equals_invoke(em: EditableModel) -> None:
    chat = ChatMemedit(editable=em)
    expected = em.chat([{"role": "user", "content": IN_SCOPE}]).text
    assert chat.invoke([HumanMessage(IN_SCOPE)]).text == expected
    chunks = list(chat.stream([HumanMessage(IN_SCOPE)]))
    assert len([c for c in chunks if c.text]) > 1
    assert "".join(c.text for c in chunks) == expected
    assert chunks[0].response_metadata["memedit"]["used_edit_ids"] == [1]
    assert all("memedit" not in c.response_metadata for c in chunks[1:])  # merged once
    assert chunks[-1].chunk_position == "last"
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.text == expected and full.response_metadata["model_name"] == "tiny"
    stops = [expected[5:7]]
    cut = "".join(c.text for c in chat.stream([HumanMessage(IN_SCOPE)], stop=stops))
    assert cut == cut_at_stop(expected, stops)


def test_local_astream_equals_invoke(em: EditableModel) -> None:
    chat = ChatMemedit(editable=em)
    expected = em.chat([{"role": "user", "content": "The sky is"}]).text

    async def read() -> list[str]:
        return [c.text async for c in chat.astream("The sky is")]

    pieces = asyncio.run(read())
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected


def test_a_stream_left_early_releases_the_model(em: EditableModel) -> None:
    chat = ChatMemedit(editable=em, max_tokens=200)
    stream = chat.stream([HumanMessage(IN_SCOPE)])
    next(stream)
    stream.close()  # what a consumer's break does to the generator
    lock = _lock(em)
    assert lock.acquire(timeout=10)  # the generation stopped and let go of it
    lock.release()
    cf = em.counterfactual
    assert isinstance(cf, MarkerPath) and cf.active == 0
