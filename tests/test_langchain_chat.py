"""`ChatMemedit` passes langchain-tests' standard chat model unit and integration tests in
both of its forms, on the real default model: around the local SmolLM2 of an
`EditableModel`, and around a real LangChain chat model (langchain-openai's `ChatOpenAI`
talking to a `memedit serve` of the bare default model on loopback) as a black box. The
features neither form has (tool calling, structured output, JSON mode, multimodal inputs,
usage metadata, a per-call model override) are switched off through the suite's properties.
The local form streams token by token (`EditableModel.chat_stream`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from memedit.editable import EditableModel, fact_context  # noqa: E402
from memedit.integrations.langchain import ChatMemedit  # noqa: E402
from memedit.stores.memory import EditMemory  # noqa: E402
from memedit.types import EditRequest  # noqa: E402

pytestmark = pytest.mark.integration

EDIT = EditRequest(
    prompt="The place of death of Leo Arons is", target_new="Berlin", subject="Leo Arons"
)
IN_SCOPE = "Where did Leo Arons die?"
TOKENS = 12  # short answers keep the suites quick on a CPU


@pytest.fixture(scope="module")
def local_em(parts: dict[str, Any]) -> Iterator[EditableModel]:
    em = EditableModel(
        parts["model"],
        parts["tok"],
        memory=EditMemory.open(None),
        scope=parts["scope"],
        counterfactual=parts["cf"],
    )
    em.edit(EDIT)
    yield em
    em.close()


@pytest.fixture(scope="module")
def black_box_em(parts: dict[str, Any]) -> Iterator[EditableModel]:
    em = EditableModel(memory=EditMemory.open(None), scope=parts["scope"], chat_fn=lambda m: "")
    em.edit(EDIT)
    yield em
    em.close()


def upstream_llm(bare_server: str, **kwargs: Any) -> Any:
    import httpx

    return langchain_openai.ChatOpenAI(
        base_url=f"{bare_server}/v1",
        model="smollm2",
        api_key="none",
        max_retries=0,
        # its own async client: langchain-openai's shared one is bound to the event loop of
        # the first test that used it, and each async test here runs in a new loop
        http_async_client=httpx.AsyncClient(),
        **kwargs,
    )


class _Common:
    """Short answers, and what ChatMemedit does not do, in the suites' own switches."""

    @property
    def chat_model_class(self) -> type[ChatMemedit]:
        return ChatMemedit

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        params = super().standard_chat_model_params  # type: ignore[misc]
        return {**params, "max_tokens": TOKENS}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatMemeditLocalUnit(_Common, ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _editable(self, local_em: EditableModel) -> None:
        self._em = local_em

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"editable": self._em}


class TestChatMemeditBlackBoxUnit(_Common, ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _editable(self, black_box_em: EditableModel, bare_server: str) -> None:
        self._em, self._llm = black_box_em, upstream_llm(bare_server)

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"editable": self._em, "llm": self._llm}


@pytest.mark.asyncio
class TestChatMemeditLocalIntegration(_Common, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _editable(self, local_em: EditableModel) -> None:
        self._em = local_em

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"editable": self._em}


@pytest.mark.asyncio
class TestChatMemeditBlackBoxIntegration(_Common, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _editable(self, black_box_em: EditableModel, bare_server: str) -> None:
        self._em, self._llm = black_box_em, upstream_llm(bare_server)

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"editable": self._em, "llm": self._llm}


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen.append(token)


def test_black_box_gets_the_edit_in_context_only_in_scope(
    black_box_em: EditableModel, bare_server: str
) -> None:
    llm = upstream_llm(bare_server, max_tokens=TOKENS)
    chat = ChatMemedit(editable=black_box_em, llm=llm)
    reply = chat.invoke(IN_SCOPE)
    meta = reply.response_metadata["memedit"]
    assert meta["in_scope"] is True and meta["used_edit_ids"] == [1]
    # exactly what the wrapped model answers when told the fact in a system message
    told = llm.invoke([SystemMessage(fact_context([EDIT])), HumanMessage(IN_SCOPE)])
    assert reply.text == told.text
    tokens = Tokens()
    streamed = list(chat.stream(IN_SCOPE, config={"callbacks": [tokens]}))
    assert len(streamed) > 1  # the wrapped model's SSE stream, chunk by chunk
    assert "".join(c.text for c in streamed) == told.text
    assert "".join(tokens.seen) == told.text  # each chunk reported to callbacks once
    assert streamed[0].response_metadata["memedit"]["in_scope"] is True
    other = "What is the capital of France?"
    reply = chat.invoke(other)
    assert reply.response_metadata["memedit"]["in_scope"] is False
    assert reply.text == llm.invoke(other).text  # unchanged


def test_local_model_answers_as_the_editable_model(local_em: EditableModel) -> None:
    chat = ChatMemedit(editable=local_em, max_tokens=TOKENS)
    reply = chat.invoke([HumanMessage(IN_SCOPE)])
    expected = local_em.chat([{"role": "user", "content": IN_SCOPE}], max_new_tokens=TOKENS)
    assert reply.text == expected.text and "Berlin" in reply.text
    assert reply.response_metadata["memedit"]["used_edit_ids"] == [1]
    cut = chat.invoke([HumanMessage(IN_SCOPE)], stop=["Berlin"])
    assert cut.text == expected.text[: expected.text.index("Berlin")]
    # streamed as SmolLM2 generates it: several chunks, the same answer, the decision first
    tokens = Tokens()
    streamed = list(chat.stream([HumanMessage(IN_SCOPE)], config={"callbacks": [tokens]}))
    assert len([c for c in streamed if c.text]) > 1
    assert "".join(c.text for c in streamed) == expected.text == "".join(tokens.seen)
    assert streamed[0].response_metadata["memedit"]["used_edit_ids"] == [1]
    assert streamed[-1].chunk_position == "last"
    cut_stream = chat.stream([HumanMessage(IN_SCOPE)], stop=["Berlin"])
    assert "".join(c.text for c in cut_stream) == cut.text
