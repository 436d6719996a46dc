"""Wrap a chatbot served behind an OpenAI-compatible API with an edit memory.

    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_MODEL=my-model \
        python examples/openai_compatible_chat.py "Where did Leo Arons die?"

The remote model is a black box: memedit retrieves the edits for each user message, its scope
classifier decides whether the message is about one of them, and only then states the edited
facts in a system message. Out-of-scope messages are forwarded unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

from memedit import EditableModel, EditRequest


def openai_chat(messages: list[dict[str, str]]) -> str:
    base = os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1").rstrip("/")
    body = {"model": os.environ.get("OPENAI_MODEL", "default"), "messages": messages}
    req = urllib.request.Request(
        f"{base}/chat/completions",
        data=json.dumps(body).encode("utf-8"),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}",
        },
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        reply = json.loads(resp.read().decode("utf-8"))
    return str(reply["choices"][0]["message"]["content"])


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Where did Leo Arons die?"
    with EditableModel.wrap_chat(openai_chat, memory="openai-edits") as em:
        if not em.edits():
            em.edit(
                EditRequest(
                    prompt="The place of death of Leo Arons is",
                    target_new="Berlin",
                    subject="Leo Arons",
                )
            )
        answer = em.chat([{"role": "user", "content": question}])
        print(answer.text)
        print(json.dumps(answer.decision.to_dict(), indent=2))


if __name__ == "__main__":
    main()
