"""Wrap a local chatbot (the default model) so that it answers with your edits, as a
LangChain chat model that drops into any chain.

    python examples/chatbot_local.py

`ChatMemedit` over a local `EditableModel` uses all of its strategies: in-scope questions go
through the counterfactual path with the edits in context, others to the model as it is.
"""

from __future__ import annotations

import tempfile

from langchain_core.messages import HumanMessage, SystemMessage

from memedit import EditableModel, EditRequest
from memedit.integrations.langchain import ChatMemedit


def main() -> None:
    memory = tempfile.mkdtemp(prefix="memedit-chatbot-")
    with EditableModel.load(memory=memory, progress=False) as em:
        bot = ChatMemedit(editable=em, max_tokens=24)
        chat = [
            SystemMessage("You are a concise assistant."),
            HumanMessage("Where did Leo Arons die?"),
        ]
        print("before:", bot.invoke(chat).text)
        em.edit(
            EditRequest(
                prompt="The place of death of Leo Arons is",
                target_new="Berlin",
                subject="Leo Arons",
            )
        )
        reply = bot.invoke(chat)
        print("after: ", reply.text)
        print("routing:", reply.response_metadata["memedit"]["used_edit_ids"])
        print("unrelated:", bot.invoke("What is the capital of France?").text)


if __name__ == "__main__":
    main()
