"""The counterfactual path protocol and the zero-training, IKE-style `TemplatePath`.

An in-scope query is answered with the retrieved edits stated in context as question/answer
pairs, the query last::

    Q: What university did Watts Humphrey attend?
    A: University of Michigan
    Q: Which college did Watts Humphrey go to?
    A:

A chat transcript gets the same pairs in its system message, rendered with the tokenizer's
chat template. A trained path (`memedit.counterfactual.adapter.AdapterPath`) uses the same
text and adds its own low-rank weights while it is active.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from memedit.generation import chat_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = [
    "CHAT_INSTRUCTION",
    "CounterfactualPath",
    "TemplatePath",
    "chat_messages",
    "fact_lines",
    "qa_prompt",
]

#: The sentence that introduces the facts in a chat transcript's system message.
CHAT_INSTRUCTION = "Answer with these facts, which are true and override anything you knew before:"


@runtime_checkable
class CounterfactualPath(Protocol):
    """How an in-scope query is answered: the text the model runs on, and the weights it runs
    with (active only inside :meth:`activate`)."""

    name: str

    def build_input(
        self, query: str, edits: Sequence[EditRequest], tokenizer: PreTrainedTokenizerBase
    ) -> str:
        """Raw text the model is run on for an in-scope ``query``."""
        ...

    def build_chat_input(
        self,
        messages: Sequence[Mapping[str, str]],
        edits: Sequence[EditRequest],
        tokenizer: PreTrainedTokenizerBase,
    ) -> str:
        """Text for a chat transcript (special tokens included; tokenize it with
        ``add_special_tokens=False``)."""
        ...

    def activate(self, model: Any) -> AbstractContextManager[Any]:
        """Context in which the path's own weights are active; the model is unchanged after."""
        ...


def _one_line(text: str) -> str:
    return " ".join(text.split())


def fact_lines(edits: Sequence[EditRequest]) -> str:
    """The edits as ``Q: prompt`` / ``A: target`` lines, one pair per edit."""
    return "".join(f"Q: {_one_line(e.prompt)}\nA: {_one_line(e.target_new)}\n" for e in edits)


def qa_prompt(query: str, edits: Sequence[EditRequest]) -> str:
    """The edits as question/answer pairs followed by ``Q: query`` and ``A:``."""
    return f"{fact_lines(edits)}Q: {_one_line(query)}\nA:"


def chat_messages(
    messages: Sequence[Mapping[str, str]], edits: Sequence[EditRequest]
) -> list[dict[str, str]]:
    """The transcript with the edits stated in its system message (merged into an existing
    one, otherwise a new first message)."""
    system = f"{CHAT_INSTRUCTION}\n{fact_lines(edits).rstrip()}"
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": f"{msgs[0]['content']}\n\n{system}"}, *msgs[1:]]
    return [{"role": "system", "content": system}, *msgs]


class TemplatePath:
    """The edits in context only (IKE-style, no training): usable with any model."""

    #: The answer is one line of the Q/A frame; the wrapper cuts generation there.
    single_line_answers = True

    name = "template-qa"

    def build_input(
        self, query: str, edits: Sequence[EditRequest], tokenizer: PreTrainedTokenizerBase
    ) -> str:
        return qa_prompt(query, edits)

    def build_chat_input(
        self,
        messages: Sequence[Mapping[str, str]],
        edits: Sequence[EditRequest],
        tokenizer: PreTrainedTokenizerBase,
    ) -> str:
        return chat_text(tokenizer, chat_messages(messages, edits))

    @contextmanager
    def _nothing(self) -> Iterator[None]:
        yield

    def activate(self, model: Any) -> AbstractContextManager[Any]:
        return self._nothing()

    def __repr__(self) -> str:
        return "TemplatePath()"
