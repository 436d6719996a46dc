"""Causal tracing over many known facts: filter, trace, average by token group, recommend
edit layers, write heatmaps (PNG) and the effects (JSON)."""

from __future__ import annotations

import dataclasses
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
    "FACT_SOURCES",
    "aggregate",
    "embedding_std",
    "known_facts",
    "load_counterfact_facts",
    "load_facts",
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


#: where trace facts come from, in this order: the ROME paper's known facts, then the true
#: facts of ROME's CounterFact split (its ``prompt`` / ``subject`` / ``ground_truth``)
FACT_SOURCES = ("known_1000", "counterfact")


def load_counterfact_facts(path: Path | None = None) -> list[dict[str, Any]]:
    """The true facts behind CounterFact's requested rewrites, in known_1000's shape
    (``known_id`` = ``"counterfact:<case_id>"``, ``attribute`` = the ground truth)."""
    if path is None:
        from memedit.paths import knowedit_dir

        path = knowedit_dir() / "dev" / "CounterFact.json"
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    facts = []
    for i, r in enumerate(records):
        missing = [k for k in ("prompt", "subject", "ground_truth") if not r.get(k)]
        if missing:
            from memedit.errors import InvalidRequestError

            msg = f"{path}: record {i} has no {missing[0]!r}"
            raise InvalidRequestError(msg, field=missing[0], value=i)
        facts.append(
            {
                "known_id": f"counterfact:{r.get('case_id', i)}",
                "subject": r["subject"],
                "attribute": str(r["ground_truth"]),
                "prompt": r["prompt"],
            }
        )
    return facts


def load_facts(sources: Sequence[str] = FACT_SOURCES) -> list[dict[str, Any]]:
    """Candidate facts from ``sources`` (names in `FACT_SOURCES`), in that order; a fact whose
    prompt and attribute an earlier source already has is dropped."""
    loaders = {"known_1000": load_known, "counterfact": load_counterfact_facts}
    unknown = [s for s in sources if s not in loaders]
    if unknown or not sources:
        from memedit.errors import InvalidRequestError

        msg = f"fact sources must be among {', '.join(FACT_SOURCES)}, got {list(sources)}"
        raise InvalidRequestError(msg, field="sources", value=list(sources))
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    for name in sources:
        for fact in loaders[name]():
            key = (fact["prompt"].strip(), fact["attribute"].strip())
            if key not in seen:
                seen.add(key)
                out.append({**fact, "source": name})
    return out


def _answer_token(tokenizer: Any, attribute: str) -> int:
    return int(tokenizer(" " + attribute.strip(), add_special_tokens=False)["input_ids"][0])


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


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
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    with torch.inference_mode():
        for group in by_len.values():
            for lo in range(0, len(group), batch):
                part = group[lo : lo + batch]
                x = torch.tensor([ids for _, ids, _ in part], device=device)
                logits = model(input_ids=x, use_cache=False, **kwargs).logits
                top = logits[:, -1].argmax(-1).tolist()
                for (i, _, answer), pred in zip(part, top, strict=True):
                    if int(pred) == answer:
                        known.add(i)
                        answers[i] = answer
    return [(dict(facts[i]), answers[i]) for i in sorted(known)]


def _examine(
    model: nn.Module, tokenizer: Any, facts: Sequence[Mapping[str, Any]], n: int, chunk: int = 256
) -> tuple[list[Mapping[str, Any]], list[tuple[dict[str, Any], int]]]:
    """The facts examined and the known ones among them: every fact of the first source (the
    noise scale comes from them), then later sources chunk by chunk until ``n`` are known (a
    forward pass per candidate; CounterFact's 6,000 would take a quarter of an hour on one
    CPU core, and only a few percent of them are known to a small model)."""
    first = facts[0].get("source") if facts else None
    head = [f for f in facts if f.get("source") == first]
    rest = [f for f in facts if f.get("source") != first]
    examined: list[Mapping[str, Any]] = list(head)
    known = known_facts(model, tokenizer, head)
    for lo in range(0, len(rest), chunk):
        if len(known) >= n:
            break
        part = rest[lo : lo + chunk]
        examined += part
        known += known_facts(model, tokenizer, part)
    return examined, known


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


def _fact_record(fact: Mapping[str, Any], ft: Any) -> dict[str, Any]:
    return {
        "known_id": fact.get("known_id"),
        "source": fact.get("source"),
        "prompt": fact["prompt"],
        "tokens": ft.tokens,
        "subject": list(ft.subject),
        "p_clean": ft.p_clean,
        "p_corrupt": ft.p_corrupt,
        "restored": ft.restored,
    }


#: every traced fact's tables, one JSON line each after a line naming the model and settings;
#: a run with the same ones resumes from it (finished facts are not traced again)
PARTIAL = "facts.jsonl"


def _resume(path: Path, identity: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """Facts traced by an earlier, interrupted run with the same model and settings (by
    known_id); otherwise starts ``path`` afresh for this run."""
    done: dict[Any, dict[str, Any]] = {}
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]) == json.loads(json.dumps(identity)):
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the interruption
                    continue
                done[record["known_id"]] = record
            kept = [lines[0], *(json.dumps(r) for r in done.values())]
            path.write_text("\n".join(kept) + "\n", encoding="utf-8")
            return done
        logger.warning("%s is from another model or settings; starting afresh", path)
    path.write_text(json.dumps(identity) + "\n", encoding="utf-8")
    return done


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the workers), user + system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(usage.ru_utime + usage.ru_stime)


_WORKER: dict[str, Any] = {}


def _worker_init(model_name: str | None, config: TraceConfig) -> None:
    import torch

    from memedit.models import load_model

    torch.set_num_threads(1)  # one process per core: no thread barriers on a busy machine
    _WORKER["model"], _WORKER["tok"] = load_model(model_name)
    _WORKER["config"] = config


def _worker_trace(item: tuple[dict[str, Any], int]) -> dict[str, Any]:
    fact, answer = item
    model, tok, config = _WORKER["model"], _WORKER["tok"], _WORKER["config"]
    return _fact_record(
        fact, trace_fact(model, tok, fact["prompt"], fact["subject"], answer, config)
    )


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
    workers: int = 1,
    sources: Sequence[str] = FACT_SOURCES,
) -> dict[str, Any]:
    """Trace the first ``n`` facts the model knows, from ``sources`` in order (known_1000
    first; ``facts_path``: one known_1000-shaped file instead), on a catalogue model and write
    ``effects.json`` and the heatmaps under ``out``. Returns the JSON document.

    ``workers > 1`` traces facts in that many processes (one thread each; each loads the
    model), for a CPU with several cores; the results are those of ``workers=1``."""
    from tqdm.auto import tqdm

    from memedit.models import load_model

    if workers < 1:
        msg = f"workers must be >= 1, got {workers!r}"
        raise ValueError(msg)
    model, tok = load_model(model_name)
    spec = ensure_spec(model)
    count = n_layers(model, spec)
    candidates = load_known(facts_path) if facts_path is not None else load_facts(sources)
    start = time.perf_counter()
    facts, known = _examine(model, tok, candidates, n)
    logger.info("%d of %d facts examined are known to the model", len(known), len(facts))
    by_source: dict[str, list[int]] = {}
    for f in facts:
        by_source.setdefault(str(f.get("source", "file")), [0, 0])[0] += 1
    for f, _ in known:
        by_source[str(f.get("source", "file"))][1] += 1
    if n > len(known):
        logger.warning(
            "--n %d asked for more facts than the %d of %d the model knows; tracing %d",
            n,
            len(known),
            len(facts),
            len(known),
        )
    chosen = known[:n]
    # sigma over the subject tokens of every known fact of the first source (the paper's
    # known_1000), so that it depends neither on n nor on the sources added after it, and a
    # run with a larger n or more sources resumes a smaller one
    first = facts[0].get("source") if facts else None
    sigma = embedding_std(model, tok, [f for f, _ in known if f.get("source") == first])
    config = TraceConfig(noise=noise_factor * sigma, samples=samples, window=window, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"model": model_name or "smollm2-135m", "config": dataclasses.asdict(config)}
    done = _resume(out / PARTIAL, identity)
    todo = [(f, a) for f, a in chosen if f.get("known_id") not in done]
    if len(todo) < len(chosen):
        logger.info("resuming: %d of %d facts already traced", len(chosen) - len(todo), len(chosen))
    bar = tqdm(
        total=len(chosen),
        initial=len(chosen) - len(todo),
        desc="causal trace",
        disable=not progress,
    )
    cpu = time.process_time() - _children_cpu()
    with (out / PARTIAL).open("a", encoding="utf-8") as log:

        def keep(record: dict[str, Any]) -> None:
            done[record["known_id"]] = record
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update()

        if workers == 1:
            for fact, answer in todo:
                ft = trace_fact(model, tok, fact["prompt"], fact["subject"], answer, config)
                keep(_fact_record(fact, ft))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            init = (model_name, config)
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_worker_init, initargs=init
            ) as pool:
                for future in as_completed([pool.submit(_worker_trace, item) for item in todo]):
                    keep(future.result())
    bar.close()
    cpu = time.process_time() - cpu + _children_cpu()
    traces = [done[f.get("known_id")] for f, _ in chosen]
    effects = aggregate(traces, config.components)
    rec = recommend(effects)
    name = model_name or "smollm2-135m"
    doc: dict[str, Any] = {
        "model": name,
        "model_type": model.config.model_type,
        "n_layers": count,
        "facts_available": len(candidates),
        "facts_examined": len(facts),
        "facts_known": len(known),
        "facts_by_source": {k: {"examined": v[0], "known": v[1]} for k, v in by_source.items()},
        "facts_traced": len(traces),
        "facts_requested": n,
        "workers": workers,
        "noise_std": config.noise,
        "noise_factor": noise_factor,
        "samples": samples,
        "window": window,
        "seed": seed,
        "dtype": str(next(model.parameters()).dtype),
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds_this_run": round(cpu, 1),
        "facts_traced_this_run": len(todo),
        "mean_p_clean": sum(t["p_clean"] for t in traces) / max(1, len(traces)),
        "mean_p_corrupt": sum(t["p_corrupt"] for t in traces) / max(1, len(traces)),
        "recommendation": rec,
        "effects": effects,
        "facts": [{k: v for k, v in t.items() if k != "restored"} for t in traces],
        "tables": f"{PARTIAL} (restored probability per component, position and layer)",
    }
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
