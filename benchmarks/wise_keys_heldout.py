"""How often WISE's key router sends unrelated questions to the side memory, and how often an
edit's rephrasing reaches its own keys, on edits outside the evaluation (issue #5).

Routing depends on the keys alone, not on the trained changes, so the edits are made with no
training step (``steps=0``) through ``WiseAdapter.prepare``/``commit``: the first ``--edits``
of ZsRE dev records 500-779 then ZsRE train records 0-219 (the evaluation uses dev 0-499), in
groups as the defaults make them. Then, with all of them in memory:

* NQ: the unrelated questions (with their answers) of ZsRE train records 32-63. The key
  filter's irrelevant pool is cut to train 0-31 here (``irrelevant_size=32``), so these are
  held out from it too; the evaluation's probes are train 64-263.
* CF: the same-subject locality questions of the first WikiData_counterfact dev records (other
  subjects than every edit's).
* rephrasings: each edit's rephrasing reaches one of its own edit's keys.

A question is routed when some token (the first left out) reaches the threshold with some key
(a key at a fragment of a word: its own higher threshold), as the side memory's router decides.

    OMP_NUM_THREADS=1 python benchmarks/wise_keys_heldout.py [--edits 500] \\
        [--options "key_tokens=last;router_threshold=0.72"]
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def _questions(records: list[Any]) -> list[str]:
    """Each locality probe of ``records`` with its first answer."""
    return [f"{p.prompt} {p.answers[0] if p.answers else ''}" for r in records for p in r.locality]


def keyed_adapter(model: Any, tok: Any, reqs: list[Any], options: str, **defaults: Any) -> Any:
    """A WiseAdapter holding ``reqs`` (edit ids 1..n) made without training (routing depends on
    the keys alone), in groups as the hyperparameters make them: ``options`` as ``k=v;k=v``
    over ``defaults``."""
    from memedit.adapters import WiseAdapter, WiseHparams
    from memedit.evaluation.strategies import parse_strategy

    given = parse_strategy(f"adapter:wise@{options}").config()["options"] if options else {}
    hp = {**defaults, **given, "steps": 0, "edit_weight": 0.0, "generic_weight": 0.0}
    size = WiseHparams(**hp).group_size or len(reqs)
    adapter = WiseAdapter(model)
    for start in range(0, len(reqs), size):
        chunk = reqs[start : start + size]
        ids = list(range(start + 1, start + len(chunk) + 1))
        adapter.commit(ids, adapter.prepare(tok, chunk, hp))
    return adapter


def main() -> None:
    import torch

    from memedit.adapters.side_memory import standardise
    from memedit.datasets import load_requests
    from memedit.intrinsic.compute import capture, encode
    from memedit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--cf", type=int, default=300, help="WikiData_counterfact questions")
    parser.add_argument("--options", default="", help="WiseHparams as k=v;k=v")
    args = parser.parse_args()

    model, tok = load_model()
    train = load_requests("ZsRE", split="train")
    reqs = (load_requests("ZsRE")[500:780] + train[:220])[: args.edits]
    nq = [
        f"{p.prompt} {p.answers[0] if p.answers else ''}" for r in train[32:64] for p in r.locality
    ]
    cf_records = load_requests("WikiData_counterfact", limit=args.cf)
    cf = [f"{p.prompt} {p.answers[0] if p.answers else ''}" for r in cf_records for p in r.locality]
    cf = cf[: args.cf]
    t0 = time.perf_counter()
    adapter = keyed_adapter(model, tok, reqs, args.options, irrelevant_size=32)
    [memory] = adapter.memories.values()
    assert memory.norm is not None
    threshold = memory.layout.router_threshold
    items = [adapter.item(i + 1) for i in range(len(reqs))]
    every = sum(it.keys.shape[0] for it in items if it.keys is not None)

    def router_input(text: str) -> torch.Tensor:
        ids = torch.tensor([encode(tok, text)])
        acts, _ = capture(model, memory.layout.router_module, ids, torch.ones_like(ids))
        return acts[0, 1:]

    def routed(texts: list[str]) -> float:
        return sum(bool(memory.match(router_input(t)).any()) for t in texts) / len(texts)

    own = 0
    for r, it in zip(reqs, items, strict=True):
        if r.rephrase and it.keys is not None:
            z = standardise(router_input(r.rephrase[0]), memory.norm)
            sims = z @ it.keys.float().T
            if it.offsets is not None:  # a key at a word fragment must match that much better
                sims = sims - it.offsets
            own += float(sims.max()) >= threshold
    print(
        f"options {args.options or '(defaults)'}: {len(reqs)} edits, {every} keys, "
        f"threshold {threshold}; routed: NQ (train 32-63) {routed(nq):.3f}, "
        f"WikiData_counterfact questions {routed(cf):.3f}; rephrasings reaching their own keys "
        f"{own / len(reqs):.3f} ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
