"""Each adapter's inference overhead on out-of-scope queries, and its time per edit (issue #5):
greedy generation of ``--tokens`` tokens on the default model with and without the adapter's
edits, for every method of ``memedit.adapters`` (or those named in ``--methods``).

    python benchmarks/adapter_overhead.py [--methods grace,lora,adalora,tpatcher,wise]
        [--edits 20] [--entries 500] [--queries 20] [--rounds 2] [--tokens 20]
        [--options "leading_subject_keys=true"]   # hyperparameters for every method named
    python benchmarks/adapter_overhead.py --methods grace --edits 0 --entries 500  # GRACE only,
                                                        # the codebook measurement alone

Queries are the first locality prompt of each of ``--queries`` ZsRE dev records that come after
every record used for an edit, so they are out of scope of every edit. The two conditions
alternate query by query (without first, then with), so a busy machine slows both alike;
overhead = median(with) / median(without) - 1, and the answers that differ between the two
are counted. Two states per method:

* **trained** (``--edits N``, 0 skips it): the first N ZsRE dev records edited one by one
  through the adapter's own path, ``adapter.prepare(tokenizer, [request])`` then
  ``adapter.commit([id], payloads)`` (what ``EditableModel.edit(strategy="adapter")`` runs,
  less the SQL log write), each with the earlier edits committed; the seconds of each
  prepare + commit are the time per edit. "With" is what the wrapper serves out-of-scope
  queries with: the weights after the commits inside ``adapter.active()`` (LoRA and AdaLoRA
  merge into the weights and hook nothing; GRACE, T-Patcher and WISE hook their block). "Without"
  is the unedited model: no hook, and every parameter the commits changed (found by comparing
  with a copy taken before the first edit) set back to its original value for that call.
  After the method's measurement its edits are removed and the weights checked bit for bit.
* **large** (``--entries M``, 0 skips it), only for the methods whose inference work grows
  with the number of edits, built without training through the same ``commit`` path:
  GRACE: a codebook of M entries, keys = block outputs at the prompts' last token of the
  first M ZsRE dev records, each value its own key (the lookup's cost does not depend on the
  values; radii by the same rules as trained entries). T-Patcher: M patches, one neuron per
  target token as in training (keys from the FFN inputs at those positions, scaled so
  ``a . k`` is 1 there), every bias 1000 so that every neuron fires at every token (the
  most work the patch path can do: both products at each token) and every value 0, so the
  answers stay the model's. An upper bound on T-Patcher's cost, not a trained state. WISE
  (key router): M edits in groups of ``group_size``, each with its real keys (the router
  module's standardised input at the subject's tokens of its prefixed prompts) and a zero
  change, so the answers stay the model's while every query is matched against all M edits'
  keys and any row that matches runs its group's side product. LoRA and AdaLoRA (merged: no
  work at inference) have no large state.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any


def main() -> None:
    from memedit.adapters import adapter_names

    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(adapter_names()))
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--entries", type=int, default=500)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--options", default="", help="the methods' hyperparameters as k=v;k=v")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(adapter_names()))
    if unknown:
        ap.error(f"unknown --methods {unknown}; known: {adapter_names()}")
    if args.options:
        from memedit.evaluation.strategies import parse_strategy

        args.hp = parse_strategy(f"adapter:x@{args.options}").config()["options"]
    else:
        args.hp = {}

    import torch

    from memedit.datasets import load_requests
    from memedit.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model) if args.model else load_model()
    used = max(args.edits, args.entries if any(m in LARGE for m in methods) else 0)
    pool = load_requests("ZsRE", limit=used + args.queries)
    held = pool[used:]
    queries = [r.locality[0].prompt if r.locality else r.prompt for r in held]
    print(
        f"queries: locality prompts of ZsRE dev records {used}-{used + len(queries) - 1}; "
        f"{args.rounds} rounds, {args.tokens} new tokens, torch threads {torch.get_num_threads()}"
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method in methods:
        if args.edits > 0:
            trained(model, tok, method, pool[: args.edits], queries, base, args)
        if args.entries > 0 and method in LARGE:
            adapter, note = LARGE[method](model, tok, pool[: args.entries], args.hp)
            print(f"{method} large state: {note}")
            measure(model, tok, f"{method}, {args.entries} untrained", adapter, queries, {}, args)


def trained(
    model: Any,
    tok: Any,
    method: str,
    edits: list[Any],
    queries: list[str],
    base: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """Edit the records one by one through the adapter's prepare + commit, time each, measure."""
    import torch

    from memedit.adapters import get_adapter

    adapter = get_adapter(method)(model)
    seconds = []
    for i, r in enumerate(edits, start=1):
        t0 = time.perf_counter()
        payloads = adapter.prepare(tok, [r], args.hp or None)
        adapter.commit([i], payloads)
        seconds.append(time.perf_counter() - t0)
    print(
        f"{method}: {len(edits)} edits trained, s per edit mean {statistics.mean(seconds):.2f} / "
        f"median {statistics.median(seconds):.2f} / min {min(seconds):.2f} / "
        f"max {max(seconds):.2f} (first {seconds[0]:.2f})"
    )
    params = dict(model.named_parameters())
    changed = {n: base[n] for n, p in params.items() if not torch.equal(p, base[n])}
    if changed:
        print(f"{method}: the commits changed {sorted(changed)}; 'without' restores them")
    measure(model, tok, f"{method}, {len(edits)} trained", adapter, queries, changed, args)
    for edit_id in adapter.edit_ids():
        adapter.remove(edit_id)
    if not all(torch.equal(p, base[n]) for n, p in model.named_parameters()):
        msg = f"{method}: removing its edits did not restore the weights"
        raise SystemExit(msg)


def measure(
    model: Any,
    tok: Any,
    label: str,
    adapter: Any,
    queries: list[str],
    changed: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """Alternate the two conditions query by query; print the medians and the overhead."""
    from memedit.generation import greedy_generate

    without = _unedited(model, changed) if changed else nullcontext

    def run(q: str, ctx: Callable[[], AbstractContextManager[Any]]) -> tuple[str, float]:
        with ctx():
            t0 = time.perf_counter()
            out = greedy_generate(model, tok, q, max_new_tokens=args.tokens)
            return out, time.perf_counter() - t0

    for q in queries[:2]:  # warm up both paths
        run(q, without)
        run(q, adapter.active)
    plain: list[float] = []
    hooked: list[float] = []
    differ = 0
    for _ in range(args.rounds):
        for q in queries:
            a, ta = run(q, without)
            b, tb = run(q, adapter.active)
            plain.append(ta)
            hooked.append(tb)
            differ += a != b
    mp, mh = statistics.median(plain), statistics.median(hooked)
    print(
        f"{label}: {len(queries)} out-of-scope queries x {args.rounds} rounds: median "
        f"{mp * 1000:.1f} ms without, {mh * 1000:.1f} ms with: overhead "
        f"{100 * (mh / mp - 1):+.2f}% (answers changed: {differ} of {len(plain)})"
    )


def _unedited(model: Any, base: dict[str, Any]) -> Callable[[], AbstractContextManager[None]]:
    """A context in which the parameters named in ``base`` hold their original values."""
    import torch

    params = dict(model.named_parameters())
    served = {n: params[n].detach().clone() for n in base}

    @contextmanager
    def ctx() -> Iterator[None]:
        with torch.no_grad():
            for n, value in base.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in served.items():
                    params[n].copy_(value)

    return ctx


def _grace_large(
    model: Any, tok: Any, records: list[Any], options: dict[str, Any]
) -> tuple[Any, str]:
    import torch

    from memedit.adapters import GraceAdapter, GraceHparams, Item
    from memedit.adapters.codebook import item_to_bytes
    from memedit.hooks import trace
    from memedit.intrinsic.compute import block_name

    hp = GraceHparams(**options)
    module = block_name(model, hp.layer_for(model))
    payloads = []
    t0 = time.perf_counter()
    for r in records:
        ids = tok(r.prompt, return_tensors="pt").to(model.device)
        with torch.no_grad(), trace(model, [module]) as tr:
            model(**ids)
        key = tr[module][0, -1].float()
        item = Item(key, key.clone(), r.target_new, hp.radius * float(key.norm()), module)
        payloads.append(item_to_bytes(item))
    adapter = GraceAdapter(model)
    adapter.commit(list(range(1, len(payloads) + 1)), payloads)
    note = (
        f"codebook: {len(adapter.codebooks[module])} entries from {len(records)} keys at "
        f"{module} ({time.perf_counter() - t0:.1f} s to capture)"
    )
    return adapter, note


def _tpatcher_large(
    model: Any, tok: Any, records: list[Any], options: dict[str, Any]
) -> tuple[Any, str]:
    import torch

    from memedit.adapters import Patch, TPatcherAdapter, TPatcherHparams
    from memedit.adapters.tpatcher import patch_to_bytes
    from memedit.hooks import trace
    from memedit.intrinsic.compute import mlp_out_name, target_batch

    device = next(model.parameters()).device
    layer = TPatcherHparams(**options).layer_for(model)
    module = mlp_out_name(model, layer).rsplit(".", 1)[0]
    payloads = []
    t0 = time.perf_counter()
    for r in records:
        batch = target_batch(tok, [(r.prompt, r.target_new)], device)
        with torch.no_grad(), trace(model, [module], inputs=True, outputs=False) as tr:
            model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        queries = tr.inputs[module][batch.keep].float()  # one row per target token
        key = queries / queries.pow(2).sum(dim=1, keepdim=True)  # a . k = 1 at its position
        n = key.shape[0]
        patch = Patch(
            module,
            key,
            torch.full((n,), 1000.0),
            torch.zeros((n, queries.shape[1])),
            queries,
            r.target_new,
        )
        payloads.append(patch_to_bytes(patch))
    adapter = TPatcherAdapter(model)
    adapter.commit(list(range(1, len(payloads) + 1)), payloads)
    neurons = sum(adapter.patch(i).neurons for i in adapter.edit_ids())
    note = (
        f"{len(payloads)} patches, {neurons} neurons at {module}, all firing, values 0 "
        f"({time.perf_counter() - t0:.1f} s to capture)"
    )
    return adapter, note


def _wise_large(
    model: Any, tok: Any, records: list[Any], options: dict[str, Any]
) -> tuple[Any, str]:
    """A WISE state of ``len(records)`` edits with their real keys (groups, filter) and every
    change 0: `prepare` with no training step, through the public API."""
    from memedit.adapters import WiseAdapter, WiseHparams

    untrained = {**options, "steps": 0, "edit_weight": 0.0, "generic_weight": 0.0}
    hp = WiseHparams(**untrained)
    adapter = WiseAdapter(model)
    t0 = time.perf_counter()
    for start in range(0, len(records), hp.group_size):
        chunk = records[start : start + hp.group_size]
        ids = list(range(start + 1, start + len(chunk) + 1))
        adapter.commit(ids, adapter.prepare(tok, chunk, untrained))
    [memory] = adapter.memories.values()
    n_keys = sum(int(k.shape[0]) for k in memory.keys.values())
    note = (
        f"{len(records)} edits in {len(memory.groups())} groups of {hp.group_size}, {n_keys} keys "
        f"at {memory.layout.router_module}, every change 0 "
        f"({time.perf_counter() - t0:.1f} s to build)"
    )
    return adapter, note


#: methods whose inference work grows with the number of edits: how to build a large state
LARGE: dict[str, Callable[[Any, Any, list[Any], dict[str, Any]], tuple[Any, str]]] = {
    "grace": _grace_large,
    "tpatcher": _tpatcher_large,
    "wise": _wise_large,
}


if __name__ == "__main__":
    main()
