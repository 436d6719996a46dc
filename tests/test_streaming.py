"""`GreedyStream` and `EditableModel.chat_stream` on a tiny random model: the deltas add up to
the unstreamed answer (stop sequences included), generation holds the lock and the context
only while it runs, and a cancelled stream stops generating."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memedit.editable import EditableModel, RouterConfig
from memedit.generation import GreedyStream, _settled_stop, cut_at_stop, greedy_generate
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

from .test_editable import REQ, MarkerPath, OverlapScope
from .tiny import tiny_llama

PROMPTS = ["Where did Leo Arons die?", "The capital of France is", "Q: What is the sky? A:"]


class Forwards:
    """Counts the model's forward passes (one per generated token after the first)."""

    def __init__(self, model: Any) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.n += 1


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model, tok = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model, tok


@pytest.fixture
def em(tmp_path: Path) -> Iterator[EditableModel]:
    model, tok = tiny_llama()
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    wrapped = EditableModel(
        model,
        tok,
        memory=mem,
        scope=OverlapScope(),
        counterfactual=MarkerPath(),
        config=RouterConfig(max_new_tokens=24),
    )
    yield wrapped
    wrapped.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_deltas_add_up_to_greedy_generate(tiny: tuple[Any, Any], prompt: str) -> None:
    model, tok = tiny
    expected = greedy_generate(model, tok, prompt, max_new_tokens=24)
    deltas = list(GreedyStream(model, tok, prompt, max_new_tokens=24))
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == expected
    stripped = list(GreedyStream(model, tok, prompt, max_new_tokens=24, strip=True))
    assert "".join(stripped) == expected.strip()


def test_stop_sequences_cut_as_cut_at_stop_and_end_generation(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    prompt = PROMPTS[0]
    full = greedy_generate(model, tok, prompt, max_new_tokens=40).strip()
    assert len(full) > 30, full
    cases = [
        [full[10:13]],  # in the middle
        [full[-3:], full[5:7]],  # the earlier match wins, whatever the order
        [full[8:14], full[9:10]],  # a short stop inside a longer one that starts earlier
        ["never in this answer"],
        [" ", "\n"],  # whitespace
        ["\ufffd"],  # what a character whose bytes are still coming decodes to, meanwhile
        [full[-1]],
    ]
    for stops in cases:
        got = "".join(GreedyStream(model, tok, prompt, max_new_tokens=40, strip=True, stop=stops))
        assert got == cut_at_stop(full, stops), stops
    counter = Forwards(model)
    try:
        stream = GreedyStream(model, tok, prompt, max_new_tokens=40, strip=True, stop=[full[4:6]])
        assert "".join(stream) == full[: full.index(full[4:6])]
    finally:
        counter.handle.remove()
    assert counter.n < 40  # the generation ended once the cut was certain


def test_settled_stop_waits_for_a_stop_that_may_start_earlier() -> None:
    # "c" is matched, but "abcd" may still match from 0: not settled; nothing is clear of it
    assert _settled_stop("abc", ["abcd", "c"]) == (None, 0)
    assert _settled_stop("abcd", ["abcd", "c"]) == (0, 0)
    assert _settled_stop("xabc", ["c"]) == (3, 3)
    assert _settled_stop("a b", ["b \n"]) == (None, 2)  # "b" may begin the stop
    assert _settled_stop("a b", []) == (None, 3)


def test_chat_stream_equals_chat_in_and_out_of_scope(em: EditableModel) -> None:
    em.edit(REQ)
    cf = em.counterfactual
    assert isinstance(cf, MarkerPath)
    for query in ("Where did Leo Arons die?", "What is the capital of France?"):
        msgs = [{"role": "user", "content": query}]
        expected = em.chat(msgs)
        stream = em.chat_stream(msgs)
        assert stream.decision == expected.decision and stream.prompt == expected.prompt
        seen_active = []
        deltas = []
        for piece in stream:
            deltas.append(piece)
            seen_active.append(cf.active)
        assert len(deltas) > 1 and "".join(deltas) == expected.text == stream.text
        assert seen_active[0] == (1 if expected.decision.in_scope else 0)  # while generating
        assert cf.active == 0  # the counterfactual path is off again
        stops = [expected.text[5:7]]
        assert "".join(em.chat_stream(msgs, stop=stops)) == cut_at_stop(expected.text, stops)


def test_async_iteration_gives_the_same_text(em: EditableModel) -> None:
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    expected = em.chat(msgs).text

    async def read() -> list[str]:
        return [piece async for piece in em.chat_stream(msgs)]

    deltas = asyncio.run(read())
    assert len(deltas) > 1 and "".join(deltas) == expected


def test_lock_is_held_while_generating_and_released_on_close(em: EditableModel) -> None:
    assert em.model is not None
    lock = threading.Lock()
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    stream = em.chat_stream(msgs, max_new_tokens=200, lock=lock)
    assert not lock.locked()  # nothing runs before the first next
    counter = Forwards(em.model)
    try:
        next(stream)
        assert lock.locked()
        stream.close()
        assert not lock.locked()  # released once the generation stopped
        assert counter.n < 100  # it stopped early (200 tokens otherwise)
        assert list(stream) == []
    finally:
        counter.handle.remove()
    # a stream waiting for a busy lock gives up when cancelled, without generating
    with lock:
        waiting = em.chat_stream(msgs, lock=lock)
        result: list[list[str]] = []
        reader = threading.Thread(target=lambda: result.append(list(waiting)))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # blocked on the lock
        waiting.cancel()
        reader.join(5)
        assert result == [[]]
    assert not lock.locked()


def test_a_failing_generation_raises_in_the_reader_and_releases_the_lock(
    tiny: tuple[Any, Any],
) -> None:
    model, tok = tiny
    lock = threading.Lock()

    def broken() -> Any:
        raise RuntimeError("hooks failed")

    stream = GreedyStream(model, tok, "The sky is", context=broken, lock=lock)
    with pytest.raises(RuntimeError, match="hooks failed"):
        next(stream)
    assert not lock.locked() and list(stream) == []
