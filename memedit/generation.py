"""Greedy generation and chat formatting for a local (model, tokenizer) pair.

Device and dtype come from the model; nothing here loads a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from memedit.types import ScopeDecision

log = logging.getLogger(__name__)

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


def answer_line_complete(text: str, prompt: str | None) -> bool:
    """Whether generated ``text`` already holds the whole line that
    `memedit.metrics_generation.answer_matches` judges: after a leading repeat of ``prompt``
    (also while that repeat may still be under way), a line break after some non-blank text.
    More tokens cannot change that line, nor the plain first line (it is complete too)."""
    text = text.lstrip()
    head = prompt.strip() if prompt else ""
    if head:
        if text.startswith(head):
            text = text[len(head) :]
        elif head.startswith(text):  # the prompt may be being repeated: not decided yet
            return False
    return "\n" in text.lstrip()


def rows_stop(
    tokenizer: PreTrainedTokenizerBase,
    prompt_width: int,
    budgets: Sequence[int],
    *,
    first_line: bool = False,
    answer_prompts: Sequence[str] | None = None,
) -> Any:
    """A transformers stopping criterion for a left-padded batch: row ``i`` is done once it
    has ``budgets[i]`` new tokens, or (``first_line``) its new text holds a line break after
    some non-blank text, or (``answer_prompts``) `answer_line_complete` holds for it with
    ``answer_prompts[i]``. The batch ends when every row is done (or at end-of-sequence)."""
    import torch
    from transformers import StoppingCriteria

    if answer_prompts is not None and len(answer_prompts) != len(budgets):
        msg = f"{len(budgets)} rows but {len(answer_prompts)} answer prompts"
        raise InvalidRequestError(msg, field="answer_prompts", value=len(answer_prompts))

    class _Rows(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = []
            for i, row in enumerate(input_ids[:, prompt_width:].tolist()):
                if len(row) >= budgets[i]:
                    done.append(True)
                    continue
                text = str(tokenizer.decode(row, skip_special_tokens=True))
                stop = first_line and "\n" in text.lstrip()
                if not stop and answer_prompts is not None:
                    stop = answer_line_complete(text, answer_prompts[i])
                done.append(stop)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Rows()


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
    answer_prompts: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuations of several texts, left-padded into batches (only the new tokens,
    decoded). ``max_new_tokens`` may differ per text: each batch runs to its longest budget
    and every text keeps its own first tokens (greedy decoding is causal, so they are the same
    as a run stopped at that budget). ``first_line``: a row stops once its first line is
    complete (for callers that keep only that line). ``answer_prompts`` (one per text): a row
    stops once the line that `memedit.metrics_generation.answer_matches` reads with that
    prompt is complete (for callers that judge only that line; the rest of the text is cut
    short). A batch stops once all its rows are done, each at its own budget at the latest.
    Padding can move a float by an ulp, so a rare near-tie may resolve differently from
    :func:`greedy_generate` on the text alone."""
    import torch

    budgets = (
        [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    if len(budgets) != len(texts) or any(not isinstance(b, int) or b < 1 for b in budgets):
        msg = f"max_new_tokens must be a positive integer or one per text, got {max_new_tokens!r}"
        raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
    if answer_prompts is not None and len(answer_prompts) != len(texts):
        msg = f"{len(texts)} texts but {len(answer_prompts)} answer prompts"
        raise InvalidRequestError(msg, field="answer_prompts", value=len(answer_prompts))
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
                stopping_criteria=[
                    rows_stop(
                        tokenizer,
                        width,
                        [budgets[i] for i in idx],
                        first_line=first_line,
                        answer_prompts=None
                        if answer_prompts is None
                        else [answer_prompts[i] for i in idx],
                    )
                ],
            )
        for j, i in enumerate(idx):
            new = gen[j, width : width + budgets[i]].tolist()
            if eos is not None and eos in new:  # stop where this text's generation ended
                new = new[: new.index(eos)]
            out[i] = str(tokenizer.decode(new, skip_special_tokens=True))
    return out


class LockLike(Protocol):
    """What `GreedyStream` needs of a lock (`threading.Lock` has it)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


_END = object()  # the generation thread is done (lock released, context left)


class GreedyStream:
    """The greedy continuation of `text`, handed out as text deltas while it is generated:
    iterate it (``for`` or ``async for``, not both). The deltas add up to exactly what
    :func:`greedy_generate` returns for the same arguments (``strip``: with the surrounding
    whitespace removed), cut at the first of the ``stop`` sequences as :func:`cut_at_stop`
    cuts it; the generation itself is ``model.generate``'s, token for token.

    The first ``next`` starts the generation in a thread of its own, which holds ``lock``
    (e.g. a server's model lock) and runs inside ``context()`` (e.g. an edit's hooks) for the
    generation's whole duration; both are released before the iteration ends, whether the
    answer is complete, a stop sequence was met or `cancel` / `close` was called (generation
    then stops after the token in progress). Close a stream that is not read to its end.

    Text is handed out once no later token can change it: a partial UTF-8 character,
    trailing whitespace (with ``strip``) or a possible start of a stop sequence waits for the
    tokens that settle it.
    ``decision`` is set by `EditableModel.chat_stream` (the scope decision behind it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        text: str,
        *,
        max_new_tokens: int = 32,
        add_special_tokens: bool = True,
        strip: bool = False,
        stop: Sequence[str] | None = None,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
        lock: LockLike | None = None,
    ) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            msg = f"max_new_tokens must be a positive integer, got {max_new_tokens!r}"
            raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
        if max_new_tokens < 1:
            msg = f"max_new_tokens must be at least 1, got {max_new_tokens}"
            raise InvalidRequestError(msg, field="max_new_tokens", value=max_new_tokens)
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = text
        self.max_new_tokens = max_new_tokens
        self.add_special_tokens = add_special_tokens
        self.strip = strip
        self.stops = [s for s in stop or () if s]
        self.context = context
        self.lock = lock
        self.decision: ScopeDecision | None = None
        self.text = ""  # handed out so far
        self._ids: list[int] = []
        self._cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._aqueue: asyncio.Queue[Any] | None = None
        self._final = False  # the text is complete (the thread may still be finishing)
        self._done = False  # the thread is done
        self._warned = False

    # ------------------------------------------------------------------ generation thread
    def _start(self, put: Callable[[Any], None]) -> None:
        def run() -> None:
            try:
                self._generate(put)
            except BaseException as exc:  # handed to the reader, raised there
                put(exc)
            else:
                put(_END)

        self._thread = threading.Thread(target=run, name="memedit-stream", daemon=True)
        self._thread.start()

    def _generate(self, put: Callable[[Any], None]) -> None:
        if self.lock is not None:
            while not self.lock.acquire(timeout=0.05):
                if self._cancel.is_set():
                    return
        try:
            if self._cancel.is_set():
                return
            with self.context() if self.context is not None else nullcontext():
                self._run_generate(put)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run_generate(self, put: Callable[[Any], None]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        cancel = self._cancel

        class _Tokens(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate hands over the prompt first
                    self.prompt_seen = True
                    return
                put([int(i) for i in value.reshape(-1).tolist()])

            def end(self) -> None:
                pass

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                return torch.full(
                    (input_ids.shape[0],),
                    cancel.is_set(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        tok = self.tokenizer
        enc = tok(self.prompt, return_tensors="pt", add_special_tokens=self.add_special_tokens)
        enc = {k: v.to(model_device(self.model)) for k, v in enc.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():  # the same call as greedy_generate's, plus the two hooks
            self.model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                streamer=_Tokens(),
                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            )

    # ------------------------------------------------------------------ text
    def _visible(self) -> str:
        text = str(self.tokenizer.decode(self._ids, skip_special_tokens=True))
        return text.lstrip() if self.strip else text

    def _take(self, item: Any) -> str:
        """The delta an item from the generation thread makes ready (may be empty)."""
        if item is _END:
            self._done = True
            return "" if self._final else self._hand_out(self._answer(), final=True)
        if isinstance(item, BaseException):
            self._done = self._final = True
            raise item
        if self._final:  # tokens generated after a stop sequence was met
            return ""
        self._ids.extend(item)
        text = self._visible()
        # what no later token can change: not a character whose bytes are still coming, nor
        # (stripped) whitespace that counts only if more text follows
        core = re.sub(r"[\s\ufffd]+\Z" if self.strip else r"\ufffd+\Z", "", text)
        hit, clear = _settled_stop(core, self.stops)
        if hit is not None:
            self.cancel()
            return self._hand_out(core[:hit], final=True)
        ready = len(core)
        if self._cleanup:  # decode may still drop the space before the last word
            last = max(core.rfind(c) for c in " \t\n\r")
            ready = last if last >= 0 else ready
        return self._hand_out(text[: min(ready, clear)], final=False)

    def _answer(self) -> str:
        text = self._visible()
        return cut_at_stop(text.strip() if self.strip else text, self.stops)

    def _hand_out(self, upto: str, *, final: bool) -> str:
        self._final = self._final or final
        if not upto.startswith(self.text):
            if not self._warned:
                log.warning(
                    "streamed text %r is no longer a prefix of the decoded answer %r: the "
                    "tokenizer's decoding changed earlier text",
                    self.text,
                    upto,
                )
                self._warned = True
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> GreedyStream:
        return self

    def __next__(self) -> str:
        if self._thread is None and not self._done:
            self._start(self._queue.put)
        while not self._done:
            delta = self._take(self._queue.get())
            if delta:
                return delta
        raise StopIteration

    def __aiter__(self) -> GreedyStream:
        return self

    async def __anext__(self) -> str:
        if self._aqueue is None and not self._done:
            loop = asyncio.get_running_loop()
            aqueue: asyncio.Queue[Any] = asyncio.Queue()
            self._aqueue = aqueue

            def put(item: Any) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads
                    loop.call_soon_threadsafe(aqueue.put_nowait, item)

            self._start(put)
        while not self._done:
            assert self._aqueue is not None
            delta = self._take(await self._aqueue.get())
            if delta:
                return delta
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the generation after the token in progress (from any thread, without
        waiting); the lock is released when it has stopped."""
        self._cancel.set()

    def close(self) -> None:
        """`cancel`, and wait until the generation has stopped and released the lock."""
        self.cancel()
        if self._thread is None:
            self._done = True
        elif self._aqueue is None:
            while not self._done:  # what is left in the queue, up to the thread's last word
                item = self._queue.get()
                self._done = item is _END or isinstance(item, BaseException)
        else:
            self._thread.join()
            self._done = True

    def __enter__(self) -> GreedyStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settled_stop(core: str, stops: Sequence[str]) -> tuple[int | None, int]:
    """Stop sequences in a streamed answer that begins with `core` (whatever follows is
    unknown): where the answer is cut, if that is certain already (the earliest match in
    `core`, and no stop could still match from before it), else None; and how much of `core`
    lies before any place a stop could still match from."""
    found = [i for i in (core.find(s) for s in stops) if i >= 0]
    clear = len(core)
    for s in stops:
        for j in range(max(0, len(core) - len(s) + 1), len(core)):
            if s.startswith(core[j:]):  # the end of core may begin this stop
                clear = min(clear, j)
                break
    hit = min(found) if found else None
    if hit is not None and hit <= clear:
        return hit, hit
    return None, clear
