"""Greedy generation and chat formatting for a local (model, tokenizer) pair.

Device and dtype come from the model; nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


def model_device(model: PreTrainedModel) -> torch.device:
    """The device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


def check_messages(messages: object) -> list[dict[str, str]]:
    """Validate a chat transcript: a non-empty list of {"role", "content"} ending with a user
    message. Returns plain dicts; raises `InvalidRequestError` naming the bad entry."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        msg = (
            "messages must be a non-empty list of {'role', 'content'} objects, "
            f"got {messages!r:.80}"
        )
        raise InvalidRequestError(msg, field="messages", value=messages)
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            msg = f"messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}"
            raise InvalidRequestError(msg, field=f"messages[{i}]", value=m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            msg = f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}"
            raise InvalidRequestError(msg, field=f"messages[{i}].role", value=role)
        if not isinstance(content, str):
            msg = f"messages[{i}].content must be a string, got {type(content).__name__}"
            raise InvalidRequestError(msg, field=f"messages[{i}].content", value=content)
        out.append({"role": str(role), "content": content})
    if out[-1]["role"] != "user":
        msg = f"the last message must come from the user, got role {out[-1]['role']!r}"
        raise InvalidRequestError(msg, field=f"messages[{len(out) - 1}].role", value=out[-1])
    return out


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """`text` up to the first occurrence of any of the stop sequences (OpenAI's and
    LangChain's ``stop``); unchanged when none occurs."""
    found = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return text[: min(found)] if found else text


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """The model input for a transcript: the tokenizer's chat template where it has one,
    otherwise a plain "Role: content" transcript ending with "Assistant:"."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def first_line_stop(tokenizer: PreTrainedTokenizerBase, prompt_width: int) -> Any:
    """A transformers stopping criterion that ends each row once its new text holds a line
    break after some non-blank text (the answer's first line is complete): callers that keep
    only the first line of an answer need not generate the rest."""
    import torch
    from transformers import StoppingCriteria

    class _FirstLine(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = []
            for row in input_ids[:, prompt_width:].tolist():
                text = str(tokenizer.decode(row, skip_special_tokens=True)).lstrip()
                done.append("\n" in text)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _FirstLine()


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_new_tokens: int = 32,
    add_special_tokens: bool = True,
    top_k: int | None = None,
    first_line: bool = False,
    stop_at_eos: bool = True,
) -> str:
    """Greedy continuation of `text` (only the new tokens, decoded). ``top_k`` samples from
    the k most likely tokens instead (seed torch first for a reproducible draw); EasyEdit's
    Fluency generates with ``top_k=5``. ``stop_at_eos=False`` generates all
    ``max_new_tokens`` tokens, past any end-of-sequence token (decoded without it), as
    EasyEdit's Fluency does."""
    import torch

    if max_new_tokens < 1:
        msg = f"max_new_tokens must be at least 1, got {max_new_tokens}"
        raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        msg = f"top_k must be a positive integer or None, got {top_k!r}"
        raise InvalidRequestError(msg, field="top_k", value=top_k)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": top_k is not None,
        "pad_token_id": pad,
    }
    if top_k is not None:
        kwargs.update(top_k=top_k, top_p=1.0, temperature=1.0)
    if first_line:  # the caller keeps only the first line: stop once it is complete
        kwargs["stopping_criteria"] = [first_line_stop(tokenizer, enc["input_ids"].shape[1])]
    if not stop_at_eos:  # an empty list: no token ends the sequence (None means "default")
        kwargs["eos_token_id"] = []
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)  # type: ignore[operator]
    new = out[0, enc["input_ids"].shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True))


def batch_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] = 32,
    add_special_tokens: bool = True,
    batch_size: int = 16,
    first_line: bool = False,
) -> list[str]:
    """Greedy continuations of several texts, left-padded into batches (only the new tokens,
    decoded). ``max_new_tokens`` may differ per text: each batch runs to its longest budget
    and every text keeps its own first tokens (greedy decoding is causal, so they are the same
    as a run stopped at that budget). ``first_line``: a row stops once its first line is
    complete (for callers that keep only that line). Padding can move a float by an ulp, so a
    rare near-tie may resolve differently from :func:`greedy_generate` on the text alone."""
    import torch

    budgets = (
        [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    if len(budgets) != len(texts) or any(not isinstance(b, int) or b < 1 for b in budgets):
        msg = f"max_new_tokens must be a positive integer or one per text, got {max_new_tokens!r}"
        raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [tokenizer(texts[i], add_special_tokens=add_special_tokens)["input_ids"]
                for i in idx]  # fmt: skip
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            if r:
                ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[j, width - len(r) :] = 1
        device = model_device(model)
        with torch.inference_mode():
            gen = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(budgets[i] for i in idx),
                do_sample=False,
                pad_token_id=pad,
                stopping_criteria=[first_line_stop(tokenizer, width)] if first_line else None,
            )
        for j, i in enumerate(idx):
            new = gen[j, width : width + budgets[i]].tolist()
            if eos is not None and eos in new:  # stop where this text's generation ended
                new = new[: new.index(eos)]
            out[i] = str(tokenizer.decode(new, skip_special_tokens=True))
    return out
