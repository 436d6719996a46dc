"""Key statistics: the second moment ``E[k kᵀ]`` of the inputs to a layer's MLP output
projection (ROME's ``layer_stats``), from text that exists offline, cached on disk.

The text comes from a pluggable :class:`TextSource`; the default, :class:`WikiBioPassages`,
reads the WikiBio passages of the KnowEdit data (``dev/WikiBio.json`` and
``train/WikiBio/*.json``: each record's ``text`` followed by its ``labels`` sentence, 67,811
SmolLM2 tokens in all). :class:`ModelSampledText` samples text from the model itself (no data
needed, as many tokens as wanted) and :class:`ChainedText` reads several sources in turn, e.g.
``ChainedText(WikiBioPassages(), ModelSampledText(model, tokenizer, n_texts=128))`` for more
tokens than WikiBio has. Texts are cut into windows of ``max_length`` tokens and run through
the model only up to the layer (the forward pass stops there); per batch the products are
taken in float32 and summed into a float64 accumulator.

The result is cached under ``cache_dir()/stats/`` in a file named by everything it depends on:
a digest of the weights the keys depend on (embeddings, the blocks below the layer and the
layer itself up to its output projection — so an edit of that projection, or of any later
layer, still finds it), the layer, the token count asked for, the model dtype, the source's
identity and the window length. Files are written atomically (temporary file + rename) and
read by any later process; :class:`KeyStatistics` also keeps the last few in memory and, by
default, pins each model object to the statistics of its weights as first seen (sequential
edits keep using the unedited model's statistics, as the reference implementations do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from memedit.errors import InvalidRequestError

from .compute import capture, encode, mlp_out_name, model_device, pad_id, pad_right
from .digest import model_digest

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SAMPLE_STARTERS",
    "ChainedText",
    "KeyStatistics",
    "ModelSampledText",
    "TextList",
    "TextSource",
    "WikiBioPassages",
    "default_statistics",
]

logger = logging.getLogger(__name__)


class TextSource(Protocol):
    """Where key statistics read their text from."""

    @property
    def identity(self) -> str:
        """Short, file-name-safe id that changes whenever the text does (part of the cache key)."""
        ...

    def texts(self) -> Iterable[str]: ...


@dataclass(frozen=True)
class TextList:
    """A fixed list of texts (tests, or any corpus already in memory)."""

    items: tuple[str, ...]
    name: str = "texts"

    @property
    def identity(self) -> str:
        h = hashlib.sha256("\x00".join(self.items).encode()).hexdigest()[:12]
        return f"{self.name}-{h}"

    def texts(self) -> Iterable[str]:
        return iter(self.items)


class WikiBioPassages:
    """KnowEdit's WikiBio passages (dev then train files), each ``text + " " + labels``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        from memedit.paths import knowedit_dir

        base = Path(root) if root is not None else knowedit_dir()
        self.files = [
            base / "dev" / "WikiBio.json",
            *sorted((base / "train" / "WikiBio").glob("*.json")),
        ]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            msg = f"WikiBio text for key statistics not found: {missing}"
            raise FileNotFoundError(msg)

    @property
    def identity(self) -> str:
        from memedit.paths import file_sha256

        h = hashlib.sha256("".join(file_sha256(f) for f in self.files).encode()).hexdigest()
        return f"wikibio-{h[:12]}"

    def texts(self) -> Iterator[str]:
        for f in self.files:
            for record in json.loads(f.read_text(encoding="utf-8")):
                parts = [record.get("text", ""), record.get("labels", "")]
                text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
                if text:
                    yield text


_MAX_IDENTITY = 120  # longer chained identities are hashed (file names stay short)


class ChainedText:
    """The texts of several sources, one source after the other (e.g. WikiBio passages, then
    text sampled from the model once they run out). The identity joins the parts' identities
    in order (hashed when that gets long), so reordering or changing any part changes it."""

    def __init__(self, *sources: TextSource) -> None:
        if not sources:
            msg = "ChainedText needs at least one text source, got none"
            raise InvalidRequestError(msg, field="sources", value=sources)
        for source in sources:
            if not callable(getattr(source, "texts", None)) or not hasattr(source, "identity"):
                msg = f"ChainedText sources need .identity and .texts(), got {source!r}"
                raise InvalidRequestError(msg, field="sources", value=source)
        self.sources: tuple[TextSource, ...] = tuple(sources)

    @property
    def identity(self) -> str:
        joined = "+".join(s.identity for s in self.sources)
        if len(joined) <= _MAX_IDENTITY:
            return joined
        h = hashlib.sha256(joined.encode()).hexdigest()[:16]
        return f"chain{len(self.sources)}-{h}"

    def texts(self) -> Iterator[str]:
        for source in self.sources:
            yield from source.texts()


#: Sampled texts start with one of these (cycled), so the samples do not all share an opening.
SAMPLE_STARTERS: tuple[str, ...] = (
    "The",
    "In",
    "A",
    "It",
    "When",
    "There",
    "This",
    "After",
    "For",
    "Many",
    "On",
    "He",
    "She",
    "We",
    "I",
    "You",
)


def _int_at_least(owner: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{owner}.{name} must be an integer >= {minimum}, got {value!r}"
        raise InvalidRequestError(msg, field=name, value=value)
    return value


class ModelSampledText:
    """Text sampled from the model itself: ``n_texts`` texts of ``tokens_per_text`` new tokens
    (end-of-sequence suppressed, so every text has them all) after a starter word (text ``i``
    starts with ``starters[i % len(starters)]``), top-``top_k`` sampling at temperature 1, on
    the model's device and in its dtype. Texts whose starters have as many tokens are sampled
    together, up to ``batch_size`` per :meth:`~transformers.GenerationMixin.generate` call
    (KV cache; no padding, hence no attention mask to apply at each step).

    Sampling uses a ``torch.Generator`` of its own seeded with ``seed`` (the global RNG is left
    alone) and happens once, on the first :meth:`texts`; the texts are then kept. With
    ``root``, they are also written there as JSON and read back by any later instance with the
    same identity.

    The identity covers the model's weights (:func:`~memedit.intrinsic.digest.model_digest`),
    its dtype and device type, the tokenizer's vocabulary and every sampling parameter. Until
    the texts are sampled it follows the current weights; once sampled, it names the weights
    they were sampled from (a later edit of the model does not change the text nor the id).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        n_texts: int,
        tokens_per_text: int = 256,
        seed: int = 0,
        top_k: int = 50,
        batch_size: int = 64,
        starters: Sequence[str] = SAMPLE_STARTERS,
        root: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        owner = type(self).__name__
        self.n_texts = _int_at_least(owner, "n_texts", n_texts)
        self.tokens_per_text = _int_at_least(owner, "tokens_per_text", tokens_per_text)
        self.seed = _int_at_least(owner, "seed", seed, minimum=0)
        self.top_k = _int_at_least(owner, "top_k", top_k)
        self.batch_size = _int_at_least(owner, "batch_size", batch_size)
        if (
            isinstance(starters, str)
            or not starters
            or not all(isinstance(s, str) and s.strip() for s in starters)
        ):
            msg = f"{owner}.starters must be non-blank strings (at least one), got {starters!r}"
            raise InvalidRequestError(msg, field="starters", value=starters)
        self.starters: tuple[str, ...] = tuple(starters)
        self.model = model
        self.tokenizer = tokenizer
        self.root = Path(root) if root is not None else None
        self.progress = progress
        self._prompts = [encode(tokenizer, s) for s in self.starters]
        limit = _max_positions(model)
        longest = max(len(p) for p in self._prompts) + self.tokens_per_text
        if limit is not None and longest > limit:
            msg = (
                f"{owner}.tokens_per_text {tokens_per_text} plus the longest starter "
                f"({longest - tokens_per_text} tokens) exceeds the model's {limit} positions"
            )
            raise InvalidRequestError(msg, field="tokens_per_text", value=tokens_per_text)
        self._samples: tuple[str, ...] | None = None
        self._identity: str | None = None
        self._vocab: str | None = None
        #: seconds the sampling took (0 until sampled, or when the texts were read from ``root``)
        self.seconds = 0.0

    @property
    def sampled(self) -> bool:
        """Whether the texts exist yet (sampled or read from ``root``)."""
        return self._samples is not None

    @property
    def identity(self) -> str:
        if self._identity is not None:
            return self._identity
        if self._vocab is None:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            self._vocab = hashlib.sha256(
                f"{type(self.tokenizer).__name__}|{vocab}".encode()
            ).hexdigest()
        param = next(self.model.parameters())
        parts = {
            "weights": model_digest(self.model),
            "dtype": str(param.dtype),
            "device": param.device.type,
            "tokenizer": self._vocab,
            "starters": self.starters,
            "batch_size": self.batch_size,
        }
        h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        return f"sampled-{self.n_texts}x{self.tokens_per_text}-k{self.top_k}-s{self.seed}-{h}"

    def texts(self) -> Iterator[str]:
        if self._samples is None:
            identity = self.identity
            path = self.root / f"{identity}.json" if self.root is not None else None
            samples = _read_texts(path) if path is not None else None
            if samples is None:
                start = time.perf_counter()
                samples = self._sample()
                self.seconds = time.perf_counter() - start
                logger.info(
                    "sampled %d texts of %d tokens in %.1f s",
                    len(samples),
                    self.tokens_per_text,
                    self.seconds,
                )
                if path is not None:
                    _write_texts(path, samples)
            self._samples = samples
            self._identity = identity
        return iter(self._samples)

    def _sample(self) -> tuple[str, ...]:
        import torch
        from tqdm.auto import tqdm
        from transformers import LogitsProcessor, LogitsProcessorList

        device = model_device(self.model)
        pad = pad_id(self.tokenizer)
        prompts = [self._prompts[i % len(self._prompts)] for i in range(self.n_texts)]
        gen = torch.Generator(device=device).manual_seed(self.seed)
        top_k = self.top_k
        bar = tqdm(
            total=self.n_texts * self.tokens_per_text,
            unit="tok",
            desc="sampling text",
            disable=not self.progress,
        )

        eos: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for given in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(given, int):
                eos.add(given)
            elif isinstance(given, (list, tuple)):
                eos.update(int(x) for x in given)
        eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)

        class _TopKSample(LogitsProcessor):
            """Draws each row's next token among its ``top_k`` most likely ones, end-of-sequence
            tokens excluded (with ``gen``), and leaves only that token finite, so that greedy
            decoding takes it. Sampling among ``k`` values is much cheaper than generate's own
            sampling (a random draw per vocabulary entry, every step) and min-length processors
            (two full-vocabulary copies per step). Works in place on ``scores``, generate's own
            copy of the logits. Also advances the progress bar."""

            def __call__(
                self, input_ids: torch.LongTensor, scores: torch.FloatTensor
            ) -> torch.FloatTensor:
                scores.index_fill_(1, eos_ids[eos_ids < scores.shape[-1]], float("-inf"))
                top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
                pick = torch.multinomial(top.values.float().softmax(-1), 1, generator=gen)
                chosen = top.indices.gather(1, pick)
                scores.fill_(float("-inf")).scatter_(1, chosen, 0.0)
                bar.update(int(scores.shape[0]))
                return scores

        # Rows of a call share their starter's length: no padding, so no attention mask to apply.
        batches: list[list[int]] = []
        for i in sorted(range(self.n_texts), key=lambda i: (len(prompts[i]), i)):
            last = batches[-1] if batches else None
            if last and len(last) < self.batch_size and len(prompts[last[0]]) == len(prompts[i]):
                last.append(i)
            else:
                batches.append([i])
        out = [""] * self.n_texts
        sampler = LogitsProcessorList([_TopKSample()])
        try:
            with torch.no_grad():
                for rows in batches:
                    ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
                    result = self.model.generate(  # type: ignore[operator]
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,  # the sampling is _TopKSample's
                        num_beams=1,
                        repetition_penalty=1.0,
                        max_new_tokens=self.tokens_per_text,
                        pad_token_id=pad,
                        use_cache=True,
                        logits_processor=sampler,
                    )
                    for i, row in zip(rows, result.tolist(), strict=True):
                        out[i] = str(self.tokenizer.decode(row, skip_special_tokens=True))
        finally:
            bar.close()
        return tuple(out)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _read_texts(path: Path) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("sampled text cache %s is unreadable; sampling again", path)
        return None
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        logger.warning("sampled text cache %s is not a list of texts; sampling again", path)
        return None
    return tuple(data)


def _write_texts(path: Path, texts: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(list(texts), ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _upstream(model: nn.Module, layer: int) -> Callable[[str], bool]:
    """Names of the tensors the keys of ``layer`` depend on (plus non-block tensors)."""
    from memedit.spec import ensure_spec

    prefix = ensure_spec(model).layers + "."
    own = mlp_out_name(model, layer) + "."

    def select(name: str) -> bool:
        if not name.startswith(prefix):
            return True
        head = name[len(prefix) :].split(".", 1)[0]
        if not head.isdigit():
            return True
        index = int(head)
        return index < layer or (index == layer and not name.startswith(own))

    return select


def _windows(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int
) -> Iterator[list[int]]:
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if window:
                yield window


def compute_second_moment(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    texts: Iterable[str],
    n_tokens: int,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """``(E[k kᵀ] in float64, tokens used)`` over at most ``n_tokens`` tokens of ``texts``."""
    import torch
    from tqdm.auto import tqdm

    from memedit.spec import weight_matrix

    module = mlp_out_name(model, layer)
    width = weight_matrix(model, module).shape[1]
    device = model_device(model)
    acc = torch.zeros((width, width), dtype=torch.float64, device=device)
    count = 0
    pad = pad_id(tokenizer)
    batch: list[list[int]] = []
    bar = tqdm(total=n_tokens, unit="tok", desc=f"key statistics {module}", disable=not progress)

    def flush() -> None:
        nonlocal count
        ids, mask = pad_right(batch, pad, device)
        keys, _ = capture(model, module, ids, mask)
        k = keys[mask.bool()][: n_tokens - count].float()
        acc.add_((k.T @ k).double())
        count += int(k.shape[0])
        bar.update(int(k.shape[0]))
        batch.clear()

    try:
        for window in _windows(tokenizer, texts, max_length):
            batch.append(window)
            if len(batch) == batch_size:
                flush()
                if count >= n_tokens:
                    break
        if batch and count < n_tokens:
            flush()
    finally:
        bar.close()
    if count == 0:
        msg = "the text source gave no tokens for key statistics"
        raise InvalidRequestError(msg, field="stats_source", value=None)
    if count < n_tokens:
        logger.warning("key statistics: the source ran out after %d of %d tokens", count, n_tokens)
    return acc / count, count


class KeyStatistics:
    """Second moments of MLP keys, per model state and layer, computed once and cached.

    ``source``: text to read (default :class:`WikiBioPassages`); ``root``: cache directory
    (default ``cache_dir()/stats``); ``disk=False`` keeps them in memory only.

    ``pin=True`` (default): a model object gets, for each layer, the statistics of its weights
    as this provider first saw them — as ROME, MEMIT and AlphaEdit use the unedited model's
    statistics throughout sequential editing (an edit of a lower layer would otherwise change
    the keys of the layers above and their cache key). ``pin=False`` follows the current
    weights. The counters ``computed`` and ``loaded`` tell how requests were served (tests,
    benchmarks). Returned tensors are shared: do not modify them in place.
    """

    def __init__(
        self,
        source: TextSource | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        disk: bool = True,
        max_length: int = 256,
        batch_size: int = 8,
        progress: bool = True,
        keep_in_memory: int = 4,
        pin: bool = True,
    ) -> None:
        self._source = source
        self.pin = pin
        self._pinned: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self._root = Path(root) if root is not None else None
        self.disk = disk
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._keep = keep_in_memory
        self.computed = 0
        self.loaded = 0
        self.last_seconds = 0.0
        self.last_tokens = 0

    @property
    def source(self) -> TextSource:
        if self._source is None:
            self._source = WikiBioPassages()
        return self._source

    @property
    def root(self) -> Path:
        if self._root is None:
            from memedit.paths import cache_dir

            self._root = cache_dir() / "stats"
        return self._root

    def cache_path(self, model: nn.Module, layer: int, n_tokens: int) -> Path:
        """The file the statistics of ``layer`` of ``model`` (as it is now) live in."""
        digest = model_digest(model, _upstream(model, layer), label=f"keys<{layer}")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        name = (
            f"layer{layer}-{n_tokens}tok-{dtype}-{self.source.identity}-"
            f"w{self.max_length}.safetensors"
        )
        return self.root / digest[:24] / name

    def second_moment(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layer: int, n_tokens: int
    ) -> torch.Tensor:
        """``E[k kᵀ]`` (float64, on the model's device) for keys of ``layer``'s MLP output."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            msg = f"n_tokens must be a positive integer, got {n_tokens!r}"
            raise InvalidRequestError(msg, field="stats_tokens", value=n_tokens)
        device = model_device(model)
        pinned = self._pinned.setdefault(model, {}) if self.pin else None
        if pinned is not None and (layer, n_tokens) in pinned:
            return pinned[(layer, n_tokens)].to(device)
        path = self.cache_path(model, layer, n_tokens)
        mom2 = self._memory.get(str(path))
        if mom2 is None:
            mom2 = self._load_or_compute(model, tokenizer, layer, n_tokens, path)
        self._memory[str(path)] = mom2
        self._memory.move_to_end(str(path))
        while len(self._memory) > self._keep:
            self._memory.popitem(last=False)
        if pinned is not None:
            pinned[(layer, n_tokens)] = mom2
        return mom2.to(device)

    def pin_cached(self, model: nn.Module, layer: int, n_tokens: int) -> bool:
        """Pin ``model`` to the statistics of its weights as they are now if they are already
        cached (on disk or in memory), without computing any; True if pinned. A wrapper that
        re-applies saved edits to a fresh base model calls this first, so later edits use the
        same statistics as the process that made the first edit."""
        import torch

        if not self.pin:
            return False
        pinned = self._pinned.setdefault(model, {})
        if (layer, n_tokens) in pinned:
            return True
        path = self.cache_path(model, layer, n_tokens)
        mom2 = self._memory.get(str(path))
        if mom2 is None:
            if not (self.disk and path.is_file()):
                return False
            mom2 = _read(path).to(torch.float64)
            self.loaded += 1
            self._memory[str(path)] = mom2
        pinned[(layer, n_tokens)] = mom2
        return True

    def _load_or_compute(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        n_tokens: int,
        path: Path,
    ) -> torch.Tensor:
        import torch

        if self.disk and path.is_file():
            self.loaded += 1
            return _read(path).to(torch.float64)
        start = time.perf_counter()
        mom2, count = compute_second_moment(
            model,
            tokenizer,
            layer,
            self.source.texts(),
            n_tokens,
            max_length=self.max_length,
            batch_size=self.batch_size,
            progress=self.progress,
        )
        self.last_seconds = time.perf_counter() - start
        self.last_tokens = count
        self.computed += 1
        logger.info(
            "key statistics for layer %d: %d tokens in %.1f s", layer, count, self.last_seconds
        )
        if self.disk:
            _write(path, mom2, {"tokens": str(count), "source": self.source.identity})
        return mom2


def _write(path: Path, mom2: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"mom2": mom2.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["mom2"]


_DEFAULT: list[KeyStatistics] = []


def default_statistics() -> KeyStatistics:
    """The process-wide :class:`KeyStatistics` used when a caller passes none (created on
    first use, never at import)."""
    if not _DEFAULT:
        _DEFAULT.append(KeyStatistics())
    return _DEFAULT[0]
