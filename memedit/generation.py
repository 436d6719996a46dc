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


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_new_tokens: int = 32,
    add_special_tokens: bool = True,
) -> str:
    """Greedy continuation of `text` (only the new tokens, decoded)."""
    import torch

    if max_new_tokens < 1:
        msg = f"max_new_tokens must be at least 1, got {max_new_tokens}"
        raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)  # type: ignore[operator]
    new = out[0, enc["input_ids"].shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True))
