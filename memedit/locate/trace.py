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
from memedit.locate.stream import run_from, stream_entry
from memedit.spec import cache_keyword, ensure_spec, n_layers, returned_cache

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
    fact; ``window``: layers restored together for mlp/attn; ``chunk``: rows per forward pass;
    ``spread``: how many first layers one batched pass of the fast path may mix (a row that
    starts later recomputes the layers in between: fewer, larger passes)."""

    noise: float
    samples: int = 3
    window: int = 10
    seed: int = 0
    chunk: int = 256
    spread: int = 4
    components: tuple[str, ...] = ("hidden", "mlp", "attn")

    def __post_init__(self) -> None:
        if not self.noise >= 0:
            msg = f"TraceConfig.noise must be >= 0, got {self.noise!r}"
            raise ValueError(msg)
        for name in ("samples", "window", "chunk", "spread"):
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


def _forward(model: nn.Module, ids: torch.Tensor, keep: bool, **kwargs: Any) -> Any:
    kwargs.setdefault("use_cache", False)
    if keep:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=ids, **kwargs)


def _probs(out: Any, answer: int) -> torch.Tensor:
    return out.logits[:, -1, :].float().softmax(-1)[:, answer]


def _answer_prob(model: nn.Module, ids: torch.Tensor, answer: int, keep: bool) -> torch.Tensor:
    return _probs(_forward(model, ids, keep), answer)


def trace_fact(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    answer: int,
    config: TraceConfig,
    *,
    fast: bool = True,
) -> FactTrace:
    """Trace one fact; ``answer`` is the token id whose probability is measured.

    ``fast`` (the default) computes the same effects with less work: the corrupted run's
    residual stream is kept, and each restoration runs only the layers from the first one it
    changes (:mod:`memedit.locate.stream`); positions before the subject, whose states the
    noise cannot reach in a causal model, restore nothing and get the corrupted probability.
    It checks on every fact that the shortened run reproduces the corrupted one and falls
    back to full forward passes (``fast=False``) where it does not."""
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
        stream = [stream_entry(spec, layer, count) for layer in range(count)]
        with corrupt(config.samples), trace(model, stream, inputs=True, outputs=False) as tc:
            out = _forward(model, batch, keep, use_cache=fast)
            p_corrupt = float(_probs(out, answer).mean())
        restored = None
        if fast:
            job = _Job(model, spec, count, ids, answer, keep, clean, config)
            job.states = torch.stack([tc[n] for n in stream])
            job.cache = returned_cache(out)
            job.cache_arg = cache_keyword(model)
            if _fast_path_holds(job, p_corrupt):
                restored = _restore_fast(job, s0, p_corrupt)
        if restored is None:
            restored = {
                c: _restore(
                    model, spec, c, count, n_tok, clean[c], ids, answer, keep, corrupt, config
                )
                for c in config.components
            }
    tokens = [tokenizer.decode([t]) for t in ids_list]
    return FactTrace(tokens, (s0, s1), p_clean, p_corrupt, restored)


@dataclass
class _Job:
    """What every restoration of one fact shares."""

    model: nn.Module
    spec: Any
    count: int
    ids: torch.Tensor  # (1, T)
    answer: int
    keep: bool
    clean: dict[str, torch.Tensor]  # component -> (L, T, H) clean outputs
    config: TraceConfig
    states: Any = None  # (L, samples, T, H): the corrupted run's input of each layer
    cache: Any = None  # the corrupted run's key/value cache (batch: samples)
    cache_arg: str = "cache"

    def run(self, start: int, t: int, jobs: int, patches: Any) -> torch.Tensor:
        """Answer probability of ``jobs * samples`` corrupted rows run from layer ``start``
        and position ``t`` on (earlier positions from the cache), with ``patches`` (module
        path -> output editor) applied; row ``s * jobs + j`` is job j under noise sample s."""
        import copy

        n_tok = self.ids.shape[1]
        rows = jobs * self.config.samples
        state = self.states[start][:, t:].repeat_interleave(jobs, 0)
        kwargs: dict[str, Any] = {}
        if t > 0:
            cache = copy.deepcopy(self.cache)
            cache.crop(-(n_tok - t))  # keep positions < t
            cache.batch_repeat_interleave(jobs)
            kwargs = {self.cache_arg: cache, "use_cache": True}
        with ExitStack() as stack:
            for path, fn in patches:
                stack.enter_context(edit_output(self.model, path, fn))
            stack.enter_context(run_from(self.model, self.spec, start, self.count, state))
            ids = self.ids[:, t:].expand(rows, n_tok - t)
            return _probs(_forward(self.model, ids, self.keep, **kwargs), self.answer)


def _fast_path_holds(job: _Job, p_corrupt: float) -> bool:
    """Do runs from the kept stream (a middle layer; the first position, and a later one from
    the cache) give the corrupted run's probability? Architectures whose forward pass cannot
    be entered this way are traced with full forward passes instead."""
    n_tok = job.ids.shape[1]
    for start, t in sorted({(job.count // 2, 0), (job.count // 2, n_tok // 2)}):
        try:
            p = float(job.run(start, t, 1, []).mean())
        except Exception as exc:  # any failure here means: trace with full passes
            logger.warning("causal trace: cannot run from a layer (%s); full passes", exc)
            return False
        if abs(p - p_corrupt) > 1e-5 + 1e-3 * abs(p_corrupt):
            logger.warning(
                "causal trace: running from layer %d, position %d gives p=%.6g, the corrupted "
                "run %.6g; using full forward passes",
                start,
                t,
                p,
                p_corrupt,
            )
            return False
    return True


def _restore_fast(job: _Job, s0: int, p_corrupt: float) -> dict[str, list[list[float]]]:
    """:func:`_restore`'s (T, L) tables of every component, with less work. A restoration at
    position t changes no position before t (causal attention) and no layer below the first
    one it patches, so each runs positions t.. (earlier ones from the corrupted run's cache)
    through layers from that first one on. Restorations at one position are batched, grouped
    so that the layers they start from differ by less than ``config.spread``: a row that
    starts later recomputes the corrupted states in between. Positions before the subject
    (whose states the noise does not reach) get the corrupted probability."""
    import torch

    config, count = job.config, job.count
    samples = config.samples
    n_tok = job.ids.shape[1]
    out = {c: torch.full((n_tok, count), p_corrupt) for c in config.components}
    spans = {
        c: [
            range(L, L + 1) if c == "hidden" else _window(L, config.window, count)
            for L in range(count)
        ]
        for c in config.components
    }
    per_call = max(1, config.chunk // samples)
    for t in range(s0, n_tok):
        todo = sorted((spans[c][L][0], c, L) for c in config.components for L in range(count))
        while todo:
            first = todo[0][0]
            part = [j for j in todo[:per_call] if j[0] < first + config.spread]
            todo = todo[len(part) :]
            n = len(part)
            patch: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
            for j, (_, c, centre) in enumerate(part):
                for layer in spans[c][centre]:
                    r, p = patch.setdefault((c, layer), ([], []))
                    r.extend(s * n + j for s in range(samples))
                    p.extend([0] * samples)  # position t is the first one run
            dev = job.ids.device
            patches = [
                (
                    _path(job.spec, c, layer),
                    _setter(
                        job.clean[c][layer, t:],
                        torch.tensor(r, device=dev),
                        torch.tensor(p, device=dev),
                    ),
                )
                for (c, layer), (r, p) in patch.items()
            ]
            probs = job.run(first, t, n, patches).cpu().view(samples, n).mean(0).tolist()
            for (_, c, centre), value in zip(part, probs, strict=True):
                out[c][t, centre] = value
    return {c: table.tolist() for c, table in out.items()}


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
