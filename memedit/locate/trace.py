"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

For one fact (prompt, subject, answer): run the prompt clean, then with Gaussian noise added
to the subject tokens' embeddings (the corrupted run), then corrupted again while restoring
one clean hidden state at one (layer, token position). The probability of the answer's first
token in the restored run, minus the corrupted one, is that state's indirect effect.

Three components are restored: the block's output (the residual stream, one layer), and the
MLP and attention outputs over a window of ``window`` layers centred on the layer (the
paper's 10), all with the same noise. All restorations of one fact run batched through
ordinary forward passes with memedit's exception-safe hooks; only the last position's logits
are computed where the model's forward accepts ``logits_to_keep``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memedit.hooks import edit_output, trace
from memedit.spec import ensure_spec, n_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "FactTrace", "TraceConfig", "subject_span", "trace_fact"]

#: restored component -> ModelSpec attribute whose module output is restored
COMPONENTS: dict[str, str] = {"hidden": "layers", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True)
class TraceConfig:
    """``noise``: absolute std of the subject-embedding noise (3 x the embeddings' std in the
    paper; :func:`memedit.locate.run.embedding_std` measures it); ``samples``: noise draws per
    fact; ``window``: layers restored together for mlp/attn; ``chunk``: rows per forward pass."""

    noise: float
    samples: int = 3
    window: int = 10
    seed: int = 0
    chunk: int = 256
    components: tuple[str, ...] = ("hidden", "mlp", "attn")

    def __post_init__(self) -> None:
        if not self.noise >= 0:
            msg = f"TraceConfig.noise must be >= 0, got {self.noise!r}"
            raise ValueError(msg)
        for name in ("samples", "window", "chunk"):
            if getattr(self, name) < 1:
                msg = f"TraceConfig.{name} must be >= 1, got {getattr(self, name)!r}"
                raise ValueError(msg)
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            msg = f"TraceConfig.components must be from {sorted(COMPONENTS)}, got {self.components}"
            raise ValueError(msg)


@dataclass
class FactTrace:
    """Result for one fact: probabilities of the answer token; ``restored[c]`` is a
    (tokens, layers) list of restored probabilities (mean over noise samples)."""

    tokens: list[str]
    subject: tuple[int, int]  # [start, end) token span
    p_clean: float
    p_corrupt: float
    restored: dict[str, list[list[float]]] = field(default_factory=dict)


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` (no special tokens) and the [start, end) span of ``subject``."""
    start_char = prompt.find(subject)
    if start_char < 0:
        msg = f"subject {subject!r} does not occur in prompt {prompt!r}"
        raise ValueError(msg)
    end_char = start_char + len(subject)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    inside = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end_char and b > start_char
    ]
    if not inside:
        msg = f"subject {subject!r} covers no token of prompt {prompt!r}"
        raise ValueError(msg)
    return ids, (inside[0], inside[-1] + 1)


def _window(layer: int, window: int, count: int) -> range:
    return range(max(0, layer - window // 2), min(count, layer - (-window // 2)))


def _answer_prob(model: nn.Module, ids: torch.Tensor, answer: int, keep: bool) -> torch.Tensor:
    kwargs: dict[str, Any] = {"use_cache": False}
    if keep:
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=ids, **kwargs).logits[:, -1, :].float()
    return logits.softmax(-1)[:, answer]


def trace_fact(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    answer: int,
    config: TraceConfig,
) -> FactTrace:
    """Trace one fact; ``answer`` is the token id whose probability is measured."""
    import torch

    spec = ensure_spec(model)
    count = n_layers(model, spec)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ids_list, (s0, s1) = subject_span(tokenizer, prompt, subject)
    n_tok = len(ids_list)
    ids = torch.tensor([ids_list], device=device)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    names = {c: [_path(spec, c, layer) for layer in range(count)] for c in config.components}

    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    with torch.inference_mode():
        all_names = [spec.embed, *(n for ns in names.values() for n in ns)]
        with trace(model, all_names) as tr:
            p_clean = float(_answer_prob(model, ids, answer, keep)[0])
        clean = {c: torch.stack([tr[n][0] for n in ns]) for c, ns in names.items()}  # (L, T, H)
        width = tr[spec.embed].shape[-1]
        noise = torch.randn(config.samples, s1 - s0, width, generator=gen) * config.noise
        noise = noise.to(device=device, dtype=dtype)

        def corrupt(rows: int) -> Any:
            def fn(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                reps = rows // config.samples
                h[:, s0:s1] += noise.repeat(reps, 1, 1)
                return h

            return edit_output(model, spec.embed, fn)

        batch = ids.expand(config.samples, n_tok)
        with corrupt(config.samples):
            p_corrupt = float(_answer_prob(model, batch, answer, keep).mean())
        restored = {
            c: _restore(model, spec, c, count, n_tok, clean[c], ids, answer, keep, corrupt, config)
            for c in config.components
        }
    tokens = [tokenizer.decode([t]) for t in ids_list]
    return FactTrace(tokens, (s0, s1), p_clean, p_corrupt, restored)


def _path(spec: Any, component: str, layer: int) -> str:
    template = getattr(spec, COMPONENTS[component])
    if component == "hidden":
        return f"{template}.{layer}"
    return str(template).format(layer=layer)


def _restore(
    model: nn.Module,
    spec: Any,
    component: str,
    count: int,
    n_tok: int,
    clean: torch.Tensor,
    ids: torch.Tensor,
    answer: int,
    keep: bool,
    corrupt: Any,
    config: TraceConfig,
) -> list[list[float]]:
    """Restored answer probability for every (token, layer) of one component: (T, L)."""
    import torch

    samples = config.samples
    # one job = (token, centre layer); each job is `samples` consecutive rows of a batch
    jobs = [(t, layer) for t in range(n_tok) for layer in range(count)]
    per_chunk = max(1, config.chunk // samples)
    out = torch.empty(len(jobs))
    for start in range(0, len(jobs), per_chunk):
        part = jobs[start : start + per_chunk]
        rows = len(part) * samples
        # layer -> (row indices, token positions) to restore at that layer's module
        patch: dict[int, tuple[list[int], list[int]]] = {}
        for j, (t, centre) in enumerate(part):
            span = range(centre, centre + 1) if component == "hidden" else None
            span = span or _window(centre, config.window, count)
            for layer in span:
                r, p = patch.setdefault(layer, ([], []))
                for s in range(samples):
                    r.append(j * samples + s)
                    p.append(t)
        with ExitStack() as stack:
            stack.enter_context(corrupt(rows))
            for layer, (r, p) in patch.items():
                rt = torch.tensor(r, device=ids.device)
                pt = torch.tensor(p, device=ids.device)
                stack.enter_context(
                    edit_output(model, _path(spec, component, layer), _setter(clean[layer], rt, pt))
                )
            probs = _answer_prob(model, ids.expand(rows, n_tok), answer, keep)
        out[start : start + len(part)] = probs.view(len(part), samples).mean(1).cpu()
    return out.view(n_tok, count).tolist()


def _setter(state: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> Any:
    def fn(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[rows, pos] = state[pos].to(h.dtype)
        return h

    return fn


def group_positions(n_tok: int, subject: tuple[int, int]) -> list[str]:
    """The paper's row group of each token position (see :data:`GROUPS`)."""
    s0, s1 = subject
    groups = []
    for i in range(n_tok):
        if i == n_tok - 1:
            groups.append("last token")
        elif i == s1 - 1:
            groups.append("last subject token")
        elif i == s0:
            groups.append("first subject token")
        elif s0 < i < s1 - 1:
            groups.append("middle subject tokens")
        elif i == s1:
            groups.append("first subsequent token")
        elif i > s1:
            groups.append("further tokens")
        else:
            groups.append("before subject")
    return groups


GROUPS: Sequence[str] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
