"""A LangChain RAG chain whose documents are your edits.

    python examples/langchain_rag.py "Where did Leo Arons die?"

`EditMemoryRetriever` returns only the edits the scope classifier puts in scope of the
question; the chain states them in the prompt of a chat model. The chat model here is the
default model through `ChatMemedit` over an `EditableModel` with an empty memory (the plain
model as a LangChain chat model); any LangChain chat model fits in its place.
"""

from __future__ import annotations

import sys
import tempfile

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from memedit import EditableModel, EditRequest
from memedit.integrations.langchain import ChatMemedit, EditMemoryRetriever
from memedit.stores.memory import EditMemory

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer in one short sentence. Facts you must use:\n{facts}"),
        ("human", "{question}"),
    ]
)


def facts(docs: list[Document]) -> str:
    return "\n".join(f"- {d.page_content}" for d in docs) or "- (none)"


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Where did Leo Arons die?"
    with EditableModel.load(memory=tempfile.mkdtemp(prefix="memedit-rag-"), progress=False) as kb:
        # the same model with an empty memory of its own: the plain model as a chat model
        plain = EditableModel(
            kb.model,
            kb.tokenizer,
            memory=EditMemory.open(None),
            scope=kb.scope,
            counterfactual=kb.counterfactual,
        )
        kb.edit(
            [
                EditRequest(
                    prompt="The place of death of Leo Arons is",
                    target_new="Berlin",
                    subject="Leo Arons",
                ),
                EditRequest(prompt="The capital of France is", target_new="Lyon", subject="France"),
            ]
        )
        retriever = EditMemoryRetriever(editable=kb, k=4)
        chain = (
            {"facts": retriever | RunnableLambda(facts), "question": RunnablePassthrough()}
            | PROMPT
            | ChatMemedit(editable=plain, max_tokens=24)
            | StrOutputParser()
        )
        print("retrieved:", [d.page_content for d in retriever.invoke(question)])
        print("answer:", chain.invoke(question))


if __name__ == "__main__":
    main()
