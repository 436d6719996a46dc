"""WISE's key router (memedit.adapters, ``router="keys"``) on tiny random models: a token goes
to the side memory when its standardised activation at the router's module is within the
cosine threshold of an edit's key (the subject's last token, or each of its tokens; keys that
reach other text are filtered out), and its row stays there from that token on (in cached
generation until its group's longest target has been decoded); rows that match no key run bit
for bit as on the unedited model. Items carry their keys and the memory's standardisation
through the edit log (format 2; format-1 items still read, as the activation router's), a
reopened memory routes and answers the same, and rollback restores the state exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from memedit import EditRequest, InvalidRequestError
from memedit.adapters import WiseAdapter
from memedit.adapters.side_memory import (
    SideMemory,
    WiseItem,
    WiseLayout,
    item_from_bytes,
    item_to_bytes,
    norm_digest,
    standardise,
)
from memedit.errors import IntegrityError
from memedit.metrics import teacher_forced_accuracy

from .adapter_kit import hook_count, logits
from .tiny import tiny_llama

HP = {
    "layer": 1,
    "steps": 150,
    "lr": 0.05,
    "margin_weight": 0.1,
    "router": "keys",
    "router_layer": 0,
    "router_threshold": 0.9,
    "stats_tokens": 4_000,  # the defaults' protections on, from a small key statistic;
    "protect_rank": 4,  # of the tiny model's 128 features (the default 256 covers them all)
}
REQ = EditRequest(prompt="Where did Leo Arons die?", target_new="Paris", subject="Leo Arons")
REQ2 = EditRequest(prompt="The capital of France is", target_new="Berlin", subject="France")
UNRELATED = "The sky is blue."


def _keys_item(keys: list[list[float]], norm: torch.Tensor, value: float = 1.0) -> WiseItem:
    layout = WiseLayout("m", (2, 3), 1, 0.5, 0, 1.0, 0.5, "keys", "r", 0.9, norm_digest(norm))
    delta = torch.full((layout.nnz(),), value, dtype=torch.float16)
    k = standardise(torch.tensor(keys), norm).to(torch.float16)
    return WiseItem(layout, 0, delta, torch.ones(1, 3), "x", layout.mask_digest(0), k, norm)


def test_match_compares_standardised_activations_with_the_keys() -> None:
    norm = torch.stack([torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 1.0])])
    mem = SideMemory(_keys_item([[2.0, 2.0, 0.0]], norm).layout)
    mem.add_many([(1, _keys_item([[2.0, 2.0, 0.0]], norm))])
    acts = torch.tensor([[[2.0, 2.0, 0.0], [4.0, 4.0, 0.0], [1.0, 0.0, 5.0]]])
    # (1, 1, 0) standardised; the same direction scaled; an orthogonal one
    assert mem.match(acts).tolist() == [[True, True, False]]
    out = torch.zeros(1, 3, 2)
    route = mem.match(acts)
    routed = mem.apply(acts, out, route)
    assert (routed[0, :2] != 0).any() and torch.equal(routed[0, 2], out[0, 2])
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    assert mem.apply(acts, out, nothing).data_ptr() == out.data_ptr()  # untouched


def test_a_key_with_an_offset_must_match_that_much_better() -> None:
    norm = torch.stack([torch.zeros(3), torch.ones(3)])
    plain = _keys_item([[1.0, 0.0, 0.0]], norm)
    item = WiseItem(**{**plain.__dict__, "offsets": torch.tensor([0.08])})
    acts = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.3, 0.0], [1.0, 0.5, 0.0]]])  # cos 1, .96, .89
    for it, expect in ((plain, [True, True, False]), (item, [True, False, False])):
        mem = SideMemory(it.layout)
        mem.add_many([(1, it)])
        assert mem.match(acts).tolist() == [expect]
    # one group with offsets beside one without: each group's best match, offsets applied
    mem = SideMemory(plain.layout)
    other = WiseItem(**{**item.__dict__, "group": 1})
    mem.add_many([(1, plain), (2, other)])
    z = standardise(acts, norm)
    expect_sims = torch.stack(
        [(z @ plain.keys.float().T).amax(-1), (z @ other.keys.float().T - 0.08).amax(-1)], -1
    )
    assert torch.allclose(mem.group_sims(acts), expect_sims, atol=1e-3)
    back = item_from_bytes(item_to_bytes(item))
    assert back.offsets is not None and torch.equal(back.offsets, item.offsets)
    assert item_from_bytes(item_to_bytes(plain)).offsets is None
    with pytest.raises(InvalidRequestError, match="offsets"):  # one offset per key
        WiseItem(**{**plain.__dict__, "offsets": torch.zeros(2)})


def test_key_items_round_trip_and_are_checked() -> None:
    norm = torch.stack([torch.zeros(3), torch.ones(3)])
    item = _keys_item([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], norm)
    back = item_from_bytes(item_to_bytes(item))
    assert back.layout == item.layout and back.layout.router == "keys"
    assert back.keys is not None and torch.equal(back.keys, item.keys)
    assert back.norm is not None and torch.equal(back.norm, norm)
    with pytest.raises(InvalidRequestError, match="keys"):  # a key-router item without keys
        WiseItem(item.layout, 0, item.delta, item.acts, "x", item.mask_digest)
    with pytest.raises(IntegrityError, match="norm"):  # a norm other than its layout's
        WiseItem(item.layout, 0, item.delta, item.acts, "x", item.mask_digest, item.keys, norm + 1)


def test_format_1_items_still_read_as_the_activation_router() -> None:
    layout = WiseLayout("m", (2, 3), 2, 0.5, 0, 1.0, 0.5)
    item = WiseItem(
        layout,
        1,
        torch.ones(layout.nnz(), dtype=torch.float16),
        torch.ones(1, 3),
        "x",
        layout.mask_digest(1),
    )
    blob = item_to_bytes(item)
    magic = b"MEMEDIT-WISE\x00"
    n = int.from_bytes(blob[len(magic) : len(magic) + 8], "little")
    meta = json.loads(blob[len(magic) + 8 : len(magic) + 8 + n])
    for key in ("router", "router_module", "router_threshold", "norm_digest"):
        del meta[key]
    meta["format"] = 1
    head = json.dumps(meta).encode()
    old = magic + len(head).to_bytes(8, "little") + head + blob[len(magic) + 8 + n :]
    back = item_from_bytes(old)
    assert back.layout == layout and back.keys is None


# ---------------------------------------------------------------------------- adapter


def test_keys_route_the_edits_and_leave_unmatched_rows_bit_for_bit(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    before = {t: logits(model, tok, t) for t in (REQ.prompt, UNRELATED)}
    payloads = adapter.prepare(tok, [REQ, REQ2], HP)
    adapter.commit([1, 2], payloads)
    [memory] = adapter.memories.values()
    assert memory.layout.router == "keys"
    assert memory.layout.router_module == "model.layers.0.mlp.down_proj"
    assert memory.groups() == [0] and memory.keys[0].shape[0] >= 2
    targets = ["Paris", "Berlin"]
    with adapter.active():
        assert teacher_forced_accuracy(model, tok, [REQ.prompt, REQ2.prompt], targets) == [1.0] * 2
        assert not torch.equal(logits(model, tok, REQ.prompt), before[REQ.prompt])
        assert torch.equal(logits(model, tok, UNRELATED), before[UNRELATED])  # no key matched
        # the edit's own prompt matches from its subject's first token on
        ids = tok(REQ.prompt, return_tensors="pt")["input_ids"]
        model(input_ids=ids)
        route = adapter._route["model.layers.1.mlp.down_proj"][0]
        assert not route[0] and bool(route[-1]) and route.int().diff().ge(0).all()
    assert hook_count(model) == 0 and adapter._route == {} and adapter._rows == {}


def test_cached_generation_keeps_a_routed_row_on_the_side_memory(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], HP))
    ids = tok(REQ.prompt, return_tensors="pt")
    target = tok(" Paris", add_special_tokens=False)["input_ids"]
    with adapter.active(), torch.no_grad():
        cached = model.generate(**ids, max_new_tokens=len(target), do_sample=False, use_cache=True)
    # every target token, also those decoded from the cache, comes from the side memory
    assert cached[0, ids["input_ids"].shape[1] :].tolist() == target


def _decode_routes(model: Any, tok: Any, adapter: WiseAdapter, extra: int) -> list[bool]:
    """Whether the last token of each forward of a cached generation of the target plus
    ``extra`` tokens was routed (the prefill first, then one entry per decoding step)."""
    [memory] = adapter.memories.values()
    seen: list[bool] = []

    def record(*_: Any) -> None:
        seen.append(bool(adapter._route[memory.layout.module][0, -1]))

    ids = tok(REQ.prompt, return_tensors="pt")
    n = len(tok(" Paris", add_special_tokens=False)["input_ids"])
    handle = model.register_forward_hook(record)
    try:
        with adapter.active(), torch.no_grad():
            model.generate(
                **ids, max_new_tokens=n + extra, min_new_tokens=n + extra, do_sample=False
            )
    finally:
        handle.remove()
    return seen


def test_generation_leaves_the_side_memory_after_the_answer(tiny: Any) -> None:
    model, tok = tiny
    n = len(tok(" Paris", add_special_tokens=False)["input_ids"])
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], HP))
    [memory] = adapter.memories.values()
    assert adapter.item(1).answer_tokens == n and memory.windows == {0: n}
    # the forwards that predict the n target tokens (the prompt's, then n - 1 decoding steps)
    # are routed; the rest are not
    routes = _decode_routes(model, tok, adapter, extra=4)
    assert len(routes) == n + 4 and routes[:n] == [True] * n and not any(routes[n:])
    assert adapter._since == {}  # the generation's state goes with the hooks
    # answer_window=False keeps the row on the side memory to the end, as before
    held = WiseAdapter(model)
    held.commit([1], held.prepare(tok, [REQ], {**HP, "answer_window": False}))
    assert held.item(1).answer_tokens == 0
    assert _decode_routes(model, tok, held, extra=4) == [True] * (n + 4)
    # the window travels with the item, and a group's is its longest target's
    assert item_from_bytes(item_to_bytes(adapter.item(1))).answer_tokens == n
    adapter.commit([2], adapter.prepare(tok, [REQ2], HP))
    longest = max(n, len(tok(" Berlin", add_special_tokens=False)["input_ids"]))
    assert memory.windows == {0: longest}
    assert memory.window_of(torch.zeros(2, dtype=torch.long)).tolist() == [longest] * 2


def test_a_reopened_memory_routes_and_answers_the_same_and_rollback_is_exact(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    payloads = adapter.prepare(tok, [REQ, REQ2], HP)
    adapter.commit([1, 2], payloads)
    with adapter.active():
        edited = logits(model, tok, REQ.prompt)
    fresh, _ = tiny_llama()
    again = WiseAdapter(fresh)
    again.commit([1, 2], payloads)
    with again.active():
        assert torch.equal(logits(fresh, tok, REQ.prompt), edited)
    # a later edit on the reopened memory keeps its standardisation (same layout)
    again.commit([3], again.prepare(tok, [REQ], HP))
    assert len(again.memories) == 1
    [memory] = adapter.memories.values()
    state = (memory.deltas[0].clone(), memory.keys[0].clone())
    adapter.commit([3], adapter.prepare(tok, [REQ], HP))
    adapter.remove(3)
    assert torch.equal(memory.deltas[0], state[0]) and torch.equal(memory.keys[0], state[1])


def test_router_settings_are_validated(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    with pytest.raises(InvalidRequestError, match="router"):
        adapter.prepare(tok, [REQ], {**HP, "router": "nearest"})
    with pytest.raises(InvalidRequestError, match="router_layer"):
        adapter.prepare(tok, [REQ], {**HP, "layer": 0, "router_layer": 1})
    with pytest.raises(InvalidRequestError, match="router_threshold"):
        adapter.prepare(tok, [REQ], {**HP, "router_threshold": 1.5})
    assert adapter.edit_ids() == []


def test_groups_hold_group_size_edits_each_and_route_to_the_best_matching_one(tiny: Any) -> None:
    model, tok = tiny
    adapter = WiseAdapter(model)
    hp = {**HP, "group_size": 1}
    payloads = adapter.prepare(tok, [REQ, REQ2], hp)
    adapter.commit([1, 2], payloads)
    [memory] = adapter.memories.values()
    assert memory.groups() == [0, 1] and [adapter.item(i).group for i in (1, 2)] == [0, 1]
    assert {adapter.item(i).shard for i in (1, 2)} == {0}  # each group starts at shard 0
    assert not torch.equal(memory.deltas[0], memory.deltas[1])
    with adapter.active():  # each prompt goes to its own group, which answers it
        both = teacher_forced_accuracy(model, tok, [REQ.prompt, REQ2.prompt], ["Paris", "Berlin"])
        assert both == [1.0, 1.0]
        model(**tok(REQ2.prompt, return_tensors="pt"))
        module = memory.layout.module
        assert int(adapter._group[module][0, -1]) == 1 and bool(adapter._route[module][0, -1])
    # item payloads carry their group; rolling the second group back leaves the first exact
    assert item_from_bytes(payloads[1]).group == 1
    first = memory.deltas[0].clone()
    adapter.remove(2)
    assert memory.groups() == [0] and torch.equal(memory.deltas[0], first)


def _subject_keys(model: Any, tok: Any, hp: dict[str, Any]) -> torch.Tensor:
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], {**hp, "steps": 0}))
    keys = adapter.item(1).keys
    assert keys is not None
    return keys.float()


def test_keys_are_taken_at_the_subjects_last_token_or_at_each_of_its_tokens(tiny: Any) -> None:
    from memedit.adapters.wise import PREFIXES, _subject_span
    from memedit.intrinsic.compute import capture

    model, tok = tiny
    raw = {**HP, "key_filter": False}
    last = _subject_keys(model, tok, {**raw, "key_tokens": "last"})
    every = _subject_keys(model, tok, {**raw, "key_tokens": "subject"})
    spans = [_subject_span(tok, p, REQ) for p in PREFIXES[:2]]
    assert last.shape[0] == 2 and every.shape[0] == sum(b - a + 1 for a, b in spans) > 2
    # the bare prompt's last-token key is that token's standardised router input
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], {**raw, "steps": 0}))
    [memory] = adapter.memories.values()
    assert memory.norm is not None
    ids = tok(REQ.prompt, return_tensors="pt")["input_ids"]
    inp, _ = capture(model, memory.layout.router_module, ids, torch.ones_like(ids))
    expect = standardise(inp[0, spans[0][1]], memory.norm).to(torch.float16).float()
    assert torch.equal(last[0], expect)
    with pytest.raises(InvalidRequestError, match="key_tokens"):
        WiseAdapter(model).prepare(tok, [REQ], {**HP, "key_tokens": "first"})


def test_keys_at_fragments_of_a_word_get_the_fragment_threshold(tiny: Any) -> None:
    from memedit.adapters.wise import PREFIXES, _continues, _subject_span

    model, tok = tiny
    hp = {**HP, "key_filter": False, "router_threshold": 0.7, "fragment_threshold": 0.8}
    req = EditRequest(
        prompt="Where did Leo Harkness die?", target_new="Paris", subject="Leo Harkness"
    )
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [req], {**hp, "steps": 0}))
    item = adapter.item(1)
    assert item.keys is not None
    expect = []
    for p in PREFIXES[:2]:
        ids = tok(p + req.prompt, add_special_tokens=False)["input_ids"]
        a, b = _subject_span(tok, p, req)
        expect += [
            0.1 if t < b and _continues(tok, ids[t], ids[t + 1]) else 0.0 for t in range(a, b + 1)
        ]
    assert 0.1 in expect and 0.0 in expect  # " Harkness" is split into pieces
    assert item.offsets is not None and item.offsets.shape == (item.keys.shape[0],)
    assert torch.allclose(item.offsets, torch.tensor(expect))
    assert [
        _continues(tok, *tok(w, add_special_tokens=False)["input_ids"][:2])
        for w in (" Harkness", " Leo Arons")
    ] == [True, False]
    # no higher threshold for fragments: no offsets at all
    same = WiseAdapter(model)
    same.commit([1], same.prepare(tok, [req], {**hp, "steps": 0, "fragment_threshold": 0.7}))
    assert same.item(1).offsets is None


def test_the_filter_drops_keys_that_reach_other_text_but_keeps_one(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny
    hp = {**HP, "key_tokens": "subject"}
    threshold = HP["router_threshold"]
    raw = _subject_keys(model, tok, {**hp, "key_filter": False})
    # generic text far from every key (the opposite directions): only the edit's own other
    # tokens can take keys away
    monkeypatch.setattr(WiseAdapter, "_reference", lambda self, *a: -raw)
    kept = _subject_keys(model, tok, hp)
    assert 1 <= kept.shape[0] <= raw.shape[0]
    # generic text that holds one key: that key goes, and those within the threshold of it
    monkeypatch.setattr(WiseAdapter, "_reference", lambda self, *a: raw[:1])
    fewer = _subject_keys(model, tok, hp)
    assert not any(torch.equal(row, raw[0]) for row in fewer)
    expect = [row for row in kept if float(row @ raw[0]) < threshold]
    assert len(expect) == fewer.shape[0] and all(
        torch.equal(a, b) for a, b in zip(expect, fewer, strict=True)
    )
    # generic text that holds every key: one key is still kept, so the edit stays routable
    monkeypatch.setattr(WiseAdapter, "_reference", lambda self, *a: raw)
    assert _subject_keys(model, tok, hp).shape[0] >= 1


def test_leading_subject_keys_key_the_subject_as_it_opens_a_text(tiny: Any) -> None:
    from memedit.intrinsic.compute import capture

    model, tok = tiny
    raw = {**HP, "key_filter": False, "key_tokens": "subject", "fragment_threshold": 0.9}
    plain = _subject_keys(model, tok, raw)
    adapter = WiseAdapter(model)
    adapter.commit([1], adapter.prepare(tok, [REQ], {**raw, "leading_subject_keys": True}))
    [memory] = adapter.memories.values()
    keys = adapter.item(1).keys
    assert keys is not None and memory.norm is not None
    ids = tok(REQ.subject, return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 2
    # the prompt's keys first, then one per token of the subject alone but its first
    assert keys.shape[0] == plain.shape[0] + ids.shape[1] - 1
    assert torch.equal(keys[: plain.shape[0]].float(), plain)
    inp, _ = capture(model, memory.layout.router_module, ids, torch.ones_like(ids))
    expect = standardise(inp[0, 1:], memory.norm).to(torch.float16)
    assert torch.equal(keys[plain.shape[0] :], expect)
    # a text that opens with the subject now reaches a key at each of its tokens but the first
    text = tok(f"{REQ.subject}'s place of death is", return_tensors="pt")["input_ids"]
    acts, _ = capture(model, memory.layout.router_module, text, torch.ones_like(text))
    assert memory.match(acts[0, 1 : ids.shape[1]]).all()
    # a one-token subject adds no key
    one = EditRequest(prompt="The sky is", target_new="green", subject="The")
    assert len(tok(one.subject)["input_ids"]) == 1
    a = WiseAdapter(model)
    a.commit([1], a.prepare(tok, [one], {**raw, "steps": 0}))
    b = WiseAdapter(model)
    b.commit([1], b.prepare(tok, [one], {**raw, "steps": 0, "leading_subject_keys": True}))
    k_a, k_b = a.item(1).keys, b.item(1).keys
    assert k_a is not None and k_b is not None and torch.equal(k_a, k_b)
