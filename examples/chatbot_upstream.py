"""Wrap a chatbot served behind an OpenAI-compatible API with an edit memory.

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_MODEL=my-model \
        python examples/chatbot_upstream.py "Where did Leo Arons die?"

The remote model is a black box: memedit retrieves the edits for each user message, its scope
classifier decides whether the message is about one of them, and only then states the edited
facts in a system message; out-of-scope messages are forwarded unchanged. (`memedit serve
--upstream URL --upstream-model NAME` does the same for any client, over HTTP.)
"""

from __future__ import annotations

import os
import sys
import tempfile

from memedit import EditableModel, EditRequest
from memedit.integrations.upstream import OpenAIUpstream


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Where did Leo Arons die?"
    upstream = OpenAIUpstream(
        os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        os.environ.get("OPENAI_MODEL", "default"),
        api_key=os.environ.get("OPENAI_API_KEY"),
    )
    memory = os.environ.get("MEMEDIT_MEMORY") or tempfile.mkdtemp(prefix="memedit-chatbot-")
    with EditableModel.wrap_chat(upstream, memory=memory, progress=False) as em:
        ask = [{"role": "user", "content": question}]
        print("before:", em.chat(ask).text)
        em.edit(
            EditRequest(
                prompt="The place of death of Leo Arons is",
                target_new="Berlin",
                subject="Leo Arons",
            )
        )
        answer = em.chat(ask)
        print("after: ", answer.text)
        print("in scope:", answer.decision.in_scope, "edits used:", answer.decision.used_edit_ids)
        other = em.chat([{"role": "user", "content": "What is the capital of France?"}])
        print("unrelated:", other.text, "(in scope:", str(other.decision.in_scope) + ")")


if __name__ == "__main__":
    main()
