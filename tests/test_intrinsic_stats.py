"""Key statistics: E[k kᵀ] is what it says, is cached on disk and reused by a new provider (as by
another process), and the cache key tells apart layers, token counts, text and model weights —
while an edit of the layer's own output projection keeps using the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memedit.hooks import trace
from memedit.intrinsic import KeyStatistics, TextList, WeightDelta, WikiBioPassages
from memedit.intrinsic.stats import compute_second_moment

from .tiny import tiny_llama

TEXT = TextList(
    (
        "The capital of France is Paris. Where did Leo Arons die?",
        "Q: A: What is the name of the spouse of a person? The sky is blue.",
        "The place of death of Leo Arons is Berlin.",
    )
    * 4,
    name="tiny",
)


def _provider(root: Path, source: TextList = TEXT) -> KeyStatistics:
    return KeyStatistics(source, root=root, progress=False, max_length=16, batch_size=3)


def test_second_moment_equals_the_mean_outer_product_of_the_keys() -> None:
    model, tok = tiny_llama()
    mom2, count = compute_second_moment(
        model, tok, 1, TEXT.texts(), 40, max_length=16, batch_size=2, progress=False
    )
    keys = []
    for text in TEXT.items:
        ids = tok(text, return_tensors="pt")["input_ids"]
        for start in range(0, ids.shape[1], 16):
            with trace(model, ["model.layers.1.mlp.down_proj"], inputs=True) as tr:
                model(input_ids=ids[:, start : start + 16])
            keys.append(tr.inputs["model.layers.1.mlp.down_proj"][0])
    k = torch.cat(keys)[:40].double()
    assert count == 40 and mom2.dtype == torch.float64 and mom2.shape == (128, 128)
    torch.testing.assert_close(mom2, k.T @ k / 40, rtol=1e-5, atol=1e-9)


def test_cache_is_hit_by_a_second_call_and_a_second_provider(tmp_path: Path) -> None:
    model, tok = tiny_llama()
    first = _provider(tmp_path)
    a = first.second_moment(model, tok, 1, 50)
    b = first.second_moment(model, tok, 1, 50)
    assert (first.computed, first.loaded) == (1, 0)
    assert torch.equal(a, b)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))

    other = _provider(tmp_path)  # as a new process would: nothing in memory
    c = other.second_moment(model, tok, 1, 50)
    assert (other.computed, other.loaded) == (0, 1)
    assert torch.equal(a, c)


@pytest.mark.parametrize("change", ["layer", "tokens", "text", "window", "lower_weights", "dtype"])
def test_cache_key_separates_what_the_statistics_depend_on(tmp_path: Path, change: str) -> None:
    model, tok = tiny_llama()
    _provider(tmp_path).second_moment(model, tok, 1, 50)
    layer, tokens, provider = 1, 50, _provider(tmp_path)
    if change == "layer":
        layer = 0
    elif change == "tokens":
        tokens = 60
    elif change == "text":
        provider = _provider(tmp_path, TextList(TEXT.items[:2] * 3, name="tiny"))
    elif change == "window":
        provider = KeyStatistics(TEXT, root=tmp_path, progress=False, max_length=8)
    elif change == "lower_weights":
        with WeightDelta.record(model, "test") as d:
            d.add_to_matrix("model.layers.0.mlp.down_proj", torch.full((64, 128), 1e-3))
    else:
        model = model.double()
    provider.second_moment(model, tok, layer, tokens)
    assert (provider.computed, provider.loaded) == (1, 0)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_editing_the_layers_own_projection_keeps_its_statistics(tmp_path: Path) -> None:
    """Keys of layer 1 are inputs of its down_proj: editing that matrix (what ROME does) or any
    later one does not change them, so sequential edits reuse the cached file."""
    model, tok = tiny_llama()
    _provider(tmp_path).second_moment(model, tok, 1, 50)
    with WeightDelta.record(model, "test") as d:
        d.add_to_matrix("model.layers.1.mlp.down_proj", torch.full((64, 128), 1e-3))
    again = _provider(tmp_path)
    again.second_moment(model, tok, 1, 50)
    assert (again.computed, again.loaded) == (0, 1)


def test_wikibio_source_reads_the_knowedit_passages(knowedit: Path) -> None:
    source = WikiBioPassages(knowedit)
    texts = list(source.texts())
    assert len(texts) == 183 + 464
    assert texts[0].startswith("This is a Wikipedia passage about john russell reynolds.")
    assert source.identity.startswith("wikibio-") and source.identity == source.identity


def test_a_provider_pins_each_models_first_statistics(tmp_path: Path) -> None:
    """Sequential editing keeps the unedited model's statistics (as ROME/MEMIT/AlphaEdit do):
    after an edit of a lower layer the same provider serves layer 1 from what it first saw,
    while ``pin=False`` follows the weights."""
    model, tok = tiny_llama()
    pinned = _provider(tmp_path)
    follow = KeyStatistics(TEXT, root=tmp_path, progress=False, max_length=16, pin=False)
    first = pinned.second_moment(model, tok, 1, 50)
    follow.second_moment(model, tok, 1, 50)
    with WeightDelta.record(model, "test") as d:
        d.add_to_matrix("model.layers.0.mlp.down_proj", torch.full((64, 128), 1e-2))
    assert torch.equal(pinned.second_moment(model, tok, 1, 50), first)
    assert (pinned.computed, pinned.loaded) == (1, 0)
    moved = follow.second_moment(model, tok, 1, 50)
    assert (follow.computed, follow.loaded) == (1, 1)
    assert not torch.equal(moved, first)
