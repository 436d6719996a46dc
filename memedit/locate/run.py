"""Causal tracing over many known facts: filter, trace, average by token group, recommend
edit layers, write heatmaps (PNG) and the effects (JSON)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memedit.locate.trace import GROUPS, TraceConfig, group_positions, subject_span, trace_fact
from memedit.spec import ensure_spec, n_layers, resolve

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "aggregate",
    "embedding_std",
    "known_facts",
    "load_known",
    "recommend",
    "run_locate",
    "write_heatmaps",
]


def load_known(path: Path | None = None) -> list[dict[str, Any]]:
    """The ROME paper's known facts (``known_1000.json`` in the KnowEdit dev directory)."""
    if path is None:
        from memedit.paths import knowedit_dir

        path = knowedit_dir() / "dev" / "known_1000.json"
    data: list[dict[str, Any]] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def _answer_token(tokenizer: Any, attribute: str) -> int:
    return int(tokenizer(" " + attribute.strip(), add_special_tokens=False)["input_ids"][0])


def known_facts(
    model: nn.Module, tokenizer: Any, facts: Sequence[Mapping[str, Any]], *, batch: int = 64
) -> list[tuple[dict[str, Any], int]]:
    """Facts whose greedy next token after the prompt is the attribute's first token, with
    that token id, in the order of ``facts``. Prompts of equal length run batched (no
    padding, so each row is computed as it would be alone)."""
    import torch

    device = next(model.parameters()).device
    by_len: dict[int, list[tuple[int, list[int], int]]] = {}
    for i, fact in enumerate(facts):
        try:
            ids, _ = subject_span(tokenizer, fact["prompt"], fact["subject"])
        except ValueError:
            continue
        by_len.setdefault(len(ids), []).append(
            (i, ids, _answer_token(tokenizer, fact["attribute"]))
        )
    known: set[int] = set()
    answers: dict[int, int] = {}
    with torch.inference_mode():
        for group in by_len.values():
            for lo in range(0, len(group), batch):
                part = group[lo : lo + batch]
                x = torch.tensor([ids for _, ids, _ in part], device=device)
                top = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1).tolist()
                for (i, _, answer), pred in zip(part, top, strict=True):
                    if int(pred) == answer:
                        known.add(i)
                        answers[i] = answer
    return [(dict(facts[i]), answers[i]) for i in sorted(known)]


def embedding_std(model: nn.Module, tokenizer: Any, facts: Sequence[Mapping[str, Any]]) -> float:
    """Std of the embedding values over all subject tokens of ``facts`` (the paper's sigma)."""
    import torch

    spec = ensure_spec(model)
    embed = resolve(model, spec.embed)
    device = next(model.parameters()).device
    ids: list[int] = []
    for fact in facts:
        toks, (s0, s1) = subject_span(tokenizer, fact["prompt"], fact["subject"])
        ids += toks[s0:s1]
    with torch.inference_mode():
        values = embed(torch.tensor([ids], device=device)).float()
    return float(values.std())


def aggregate(traces: Sequence[Mapping[str, Any]], components: Sequence[str]) -> dict[str, Any]:
    """Mean indirect effect (restored - corrupted probability) per component, token group and
    layer: each fact's positions are averaged within a group first, then facts are averaged
    (a fact without tokens in a group does not count for it)."""
    out: dict[str, Any] = {}
    for c in components:
        table: dict[str, list[float]] = {}
        for g in GROUPS:
            rows = []
            for tr in traces:
                restored = tr["restored"][c]
                groups = group_positions(len(restored), tuple(tr["subject"]))
                mine = [r for r, gg in zip(restored, groups, strict=True) if gg == g]
                if mine:
                    n_layer = len(mine[0])
                    mean = [sum(r[i] for r in mine) / len(mine) for i in range(n_layer)]
                    rows.append([m - tr["p_corrupt"] for m in mean])
            if rows:
                table[g] = [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]
        out[c] = table
    return out


def recommend(
    effects: Mapping[str, Mapping[str, Sequence[float]]], width: int = 5
) -> dict[str, Any]:
    """ROME: the layer with the largest MLP effect at the last subject token; MEMIT/AlphaEdit:
    the ``width`` consecutive layers with the largest summed MLP effect there."""
    row = list(effects["mlp"]["last subject token"])
    rome = max(range(len(row)), key=lambda i: row[i])
    width = min(width, len(row))
    starts = range(len(row) - width + 1)
    lo = max(starts, key=lambda s: sum(row[s : s + width]))
    return {
        "rome_layer": rome,
        "memit_layers": list(range(lo, lo + width)),
        "criterion": "argmax of the MLP indirect effect at the last subject token (ROME); "
        f"the {width}-layer window with the largest summed effect there (MEMIT/AlphaEdit)",
    }


def write_heatmaps(
    effects: Mapping[str, Mapping[str, Sequence[float]]], out: Path, title: str
) -> list[Path]:
    """One PNG per component: rows = token groups, columns = layers, like the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    labels = {"hidden": "single restored layer (residual)", "mlp": "MLP", "attn": "Attention"}
    paths = []
    for c, table in effects.items():
        groups = [g for g in GROUPS if g in table]
        data = [list(table[g]) for g in groups]
        fig, ax = plt.subplots(figsize=(7, 2.8), dpi=120)
        im = ax.imshow(data, aspect="auto", cmap=cmaps.get(c, "viridis"), vmin=0)
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xlabel("layer" if c == "hidden" else "centre of the restored layer window")
        ax.set_title(f"{title}: {labels.get(c, c)}", fontsize=9)
        fig.colorbar(im, ax=ax, label="avg indirect effect")
        fig.tight_layout()
        path = out / f"trace-{c}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def run_locate(
    model_name: str | None = None,
    *,
    n: int = 200,
    out: Path = Path("docs/locate"),
    samples: int = 3,
    window: int = 10,
    noise_factor: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    facts_path: Path | None = None,
) -> dict[str, Any]:
    """Trace the first ``n`` known facts of ``known_1000.json`` on a catalogue model and write
    ``effects.json`` and the heatmaps under ``out``. Returns the JSON document."""
    from tqdm.auto import tqdm

    from memedit.models import load_model

    model, tok = load_model(model_name)
    spec = ensure_spec(model)
    count = n_layers(model, spec)
    facts = load_known(facts_path)
    start = time.perf_counter()
    known = known_facts(model, tok, facts)
    logger.info("%d of %d facts are known to the model", len(known), len(facts))
    chosen = known[:n]
    sigma = embedding_std(model, tok, [f for f, _ in chosen])
    config = TraceConfig(noise=noise_factor * sigma, samples=samples, window=window, seed=seed)
    traces = []
    for fact, answer in tqdm(chosen, desc="causal trace", disable=not progress):
        ft = trace_fact(model, tok, fact["prompt"], fact["subject"], answer, config)
        traces.append(
            {
                "known_id": fact.get("known_id"),
                "prompt": fact["prompt"],
                "tokens": ft.tokens,
                "subject": list(ft.subject),
                "p_clean": ft.p_clean,
                "p_corrupt": ft.p_corrupt,
                "restored": ft.restored,
            }
        )
    effects = aggregate(traces, config.components)
    rec = recommend(effects)
    name = model_name or "smollm2-135m"
    doc: dict[str, Any] = {
        "model": name,
        "model_type": model.config.model_type,
        "n_layers": count,
        "facts_examined": len(facts),
        "facts_known": len(known),
        "facts_traced": len(traces),
        "noise_std": config.noise,
        "noise_factor": noise_factor,
        "samples": samples,
        "window": window,
        "seed": seed,
        "dtype": str(next(model.parameters()).dtype),
        "seconds": round(time.perf_counter() - start, 1),
        "mean_p_clean": sum(t["p_clean"] for t in traces) / max(1, len(traces)),
        "mean_p_corrupt": sum(t["p_corrupt"] for t in traces) / max(1, len(traces)),
        "recommendation": rec,
        "effects": effects,
        "facts": traces,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "effects.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    write_heatmaps(effects, out, f"{name}, {len(traces)} known facts")
    return doc


def spec_hint(doc: Mapping[str, Any]) -> str:
    """Python lines that configure the measured layers for the traced architecture."""
    rec = doc["recommendation"]
    layers = tuple(rec["memit_layers"])
    return (
        f"# measured by `memedit locate` on {doc['model']} ({doc['facts_traced']} known facts)\n"
        "from dataclasses import replace\n"
        "from memedit.spec import get_spec, register_spec\n"
        f"register_spec({doc['model_type']!r}, replace(get_spec({doc['model_type']!r}), "
        f"rome_layer={rec['rome_layer']}, memit_layers={layers}))"
    )
