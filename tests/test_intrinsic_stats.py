"""Key statistics: E[k kᵀ] is what it says, is cached on disk and reused by a new provider (as by
another process), and the cache key tells apart layers, token counts, text and model weights —
while an edit of the layer's own output projection keeps using the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from memedit.errors import InvalidRequestError
from memedit.hooks import trace
from memedit.intrinsic import (
    SAMPLE_STARTERS,
    ChainedText,
    KeyStatistics,
    ModelSampledText,
    TextList,
    TextSource,
    WeightDelta,
    WikiBioPassages,
)
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


def _provider(root: Path, source: TextSource = TEXT) -> KeyStatistics:
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


# --- text sampled from the model, chained sources --------------------------------------------


def _sampled(model: Any, tok: Any, **options: Any) -> ModelSampledText:
    given: dict[str, Any] = {"n_texts": 5, "tokens_per_text": 12, "batch_size": 2}
    given.update(options)
    return ModelSampledText(model, tok, progress=False, **given)


def _count_generate(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records ``(rows, prompt tokens)`` of each ``model.generate`` call (still running it) and
    checks that no call pads its prompts."""
    calls: list[tuple[int, int]] = []
    real = model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        assert bool(kwargs["attention_mask"].all())
        calls.append((int(ids.shape[0]), int(ids.shape[1])))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


def test_sampled_text_is_deterministic_per_seed_and_leaves_the_global_rng_alone() -> None:
    model, tok = tiny_llama()
    rng = torch.get_rng_state()
    first = _sampled(model, tok)
    texts = list(first.texts())
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(texts) == 5 and len(set(texts)) == 5
    # starters are cycled: text i opens with starter i (the tokens generated after it vary)
    assert [t.startswith(s) for t, s in zip(texts, SAMPLE_STARTERS, strict=False)] == [True] * 5
    # every text carries its 12 generated tokens (end of sequence is suppressed)
    assert all(len(tok(t)["input_ids"]) > 12 for t in texts)

    again = _sampled(model, tok)
    assert list(again.texts()) == texts and again.identity == first.identity
    other = _sampled(model, tok, seed=1)
    assert other.identity != first.identity
    assert list(other.texts()) != texts
    for option, value in [("n_texts", 6), ("tokens_per_text", 13), ("top_k", 5), ("batch_size", 3)]:
        assert _sampled(model, tok, **{option: value}).identity != first.identity, option


def test_sampled_text_identity_follows_the_weights_until_it_is_sampled() -> None:
    model, tok = tiny_llama()
    source = _sampled(model, tok)
    before = source.identity
    assert _sampled(tiny_llama(seed=1)[0], tok).identity != before
    with WeightDelta.record(model, "test") as d:
        d.add_to_matrix("model.layers.1.mlp.down_proj", torch.full((64, 128), 1e-3))
    edited = source.identity
    assert edited != before and not source.sampled
    texts = list(source.texts())  # sampled from the edited weights, and named after them
    assert source.sampled and source.identity == edited
    d.revert()
    assert source.identity == edited and list(source.texts()) == texts
    assert _sampled(model, tok).identity == before


def test_sampled_text_is_generated_once_in_batches_of_equal_length_starters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tok = tiny_llama()
    starters = ("The", "In", "A", "It", "When")
    lengths = [len(tok(s)["input_ids"]) for s in starters]
    assert lengths == [1, 2, 1, 2, 2]  # the tiny tokenizer splits some of them
    calls = _count_generate(model, monkeypatch)
    source = _sampled(model, tok, n_texts=7, batch_size=2, starters=starters)
    assert calls == []  # nothing is sampled before the texts are read
    a = list(source.texts())
    b = list(source.texts())
    assert a == b
    # 1-token starters: texts 0, 2, 5; 2-token starters: texts 1, 3, 4, 6 — batched apart
    assert calls == [(2, 1), (1, 1), (2, 2), (2, 2)]
    assert [t.startswith(starters[i % 5]) for i, t in enumerate(a)] == [True] * 7


def test_sampled_text_is_read_back_from_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny_llama()
    first = _sampled(model, tok, root=tmp_path)
    texts = list(first.texts())
    assert first.seconds > 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.identity}.json"]
    calls = _count_generate(model, monkeypatch)
    second = _sampled(model, tok, root=tmp_path)
    assert list(second.texts()) == texts and calls == [] and second.seconds == 0.0


def test_chained_text_reads_its_sources_in_order() -> None:
    a = TextList(("one", "two"), name="a")
    b = TextList(("three",), name="b")
    chained = ChainedText(a, b)
    assert list(chained.texts()) == ["one", "two", "three"]
    assert list(chained.texts()) == ["one", "two", "three"]  # readable again
    assert chained.identity == f"{a.identity}+{b.identity}"
    assert ChainedText(b, a).identity == f"{b.identity}+{a.identity}"
    assert ChainedText(a).identity == a.identity
    long = ChainedText(*[TextList((str(i),), name=f"part{i}") for i in range(20)])
    assert long.identity.startswith("chain20-") and len(long.identity) < 40
    assert long.identity != ChainedText(*reversed(long.sources)).identity


def test_key_statistics_from_chained_sampled_text_compute_then_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More tokens than the first source has: the model-sampled texts supply the rest, the
    result is E[k kᵀ] over both, and a new provider (with a new, not yet sampled source) finds
    the file without sampling."""
    model, tok = tiny_llama()
    own = sum(len(tok(t)["input_ids"]) for t in TEXT.items)
    n_tokens = own + 40
    sampled = _sampled(model, tok)
    first = _provider(tmp_path, ChainedText(TEXT, sampled))
    mom2 = first.second_moment(model, tok, 1, n_tokens)
    assert (first.computed, first.loaded, first.last_tokens) == (1, 0, n_tokens)
    expected, count = compute_second_moment(
        model,
        tok,
        1,
        [*TEXT.items, *sampled.texts()],
        n_tokens,
        max_length=16,
        batch_size=3,
        progress=False,
    )
    assert count == n_tokens
    torch.testing.assert_close(mom2, expected, rtol=1e-6, atol=1e-12)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and sampled.identity in files[0].name

    calls = _count_generate(model, monkeypatch)
    fresh = _sampled(model, tok)
    again = _provider(tmp_path, ChainedText(TEXT, fresh))
    assert torch.equal(again.second_moment(model, tok, 1, n_tokens), mom2)
    assert (again.computed, again.loaded) == (0, 1)
    assert calls == [] and not fresh.sampled


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_texts", 0),
        ("n_texts", -3),
        ("n_texts", True),
        ("n_texts", 2.5),
        ("tokens_per_text", 0),
        ("tokens_per_text", 300),  # more than the model's 256 positions
        ("top_k", 0),
        ("batch_size", 0),
        ("seed", -1),
        ("starters", ()),
        ("starters", ("The", " ")),
        ("starters", "The"),
    ],
)
def test_sampled_text_rejects_bad_arguments(field: str, value: object) -> None:
    model, tok = tiny_llama()
    with pytest.raises(InvalidRequestError) as err:
        _sampled(model, tok, **{field: value})
    assert err.value.field == field and err.value.value == value
    assert field in str(err.value) and repr(value) in str(err.value)


def test_chained_text_rejects_no_sources_and_non_sources() -> None:
    with pytest.raises(InvalidRequestError) as err:
        ChainedText()
    assert err.value.field == "sources"
    with pytest.raises(InvalidRequestError) as err:
        ChainedText(TEXT, "not a source")
    assert err.value.field == "sources" and err.value.value == "not a source"


def test_sampled_tokens_come_from_the_top_k_and_never_end_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even a model that would always end the text right away gets its ``tokens_per_text``
    tokens, each among the ``top_k`` most likely once end of sequence is excluded; ``top_k=1``
    is greedy decoding."""
    model, tok = tiny_llama()
    eos = tok.eos_token_id

    def favour_eos(_module: Any, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        boost = torch.zeros(out.shape[-1])
        boost[eos] = 100.0
        return out + boost

    model.lm_head.register_forward_hook(favour_eos)
    results: list[torch.Tensor] = []
    real = model.generate

    def keep(**kwargs: Any) -> torch.Tensor:
        results.append(real(**kwargs))
        return results[-1]

    monkeypatch.setattr(model, "generate", keep)

    def next_token_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].clone()
        logits[..., eos] = float("-inf")
        return logits

    one_batch: dict[str, Any] = {"n_texts": 3, "tokens_per_text": 10, "batch_size": 3}
    texts = list(_sampled(model, tok, top_k=3, starters=("The",), **one_batch).texts())
    ids = results[0]
    assert ids.shape == (3, 1 + 10) and not bool((ids == eos).any()) and len(texts) == 3
    top3 = next_token_logits(ids).topk(3, dim=-1).indices
    assert bool((top3 == ids[:, 1:, None]).any(-1).all())
    assert len({tuple(row) for row in ids.tolist()}) == 3  # sampled, not all the same

    list(_sampled(model, tok, top_k=1, starters=("The",), **one_batch).texts())
    greedy = results[1]
    assert torch.equal(next_token_logits(greedy).argmax(-1), greedy[:, 1:])
