"""Turn an evaluation directory into tables and plots.

`summarise` averages the per-record JSONL (all workers' files merged): a plain metric is the
mean over records that have it; a grouped one (``portability/<kind>``) is averaged over the kinds
each record has, then over the records that have any, as EasyEdit's KnowEdit summary does
(``examples/run_knowedit_llama2.py``: a record's Portability is the mean of its kinds' means).
Until 2026-12-06 the kinds were averaged over records first and then over kinds, which weighs a
rare kind (e.g. WikiData_counterfact's Logical_Generalization, on few records) as much as a
common one; with EasyEdit's order our FT-L at its layer reproduces EasyEdit's FT-L figures on
this model to the hundredth (docs/eval/NOTES.md). `write_reports` writes
``summary.json``, ``summary.md`` and ``summary.csv`` (rows = metrics, columns = strategies, one
block per dataset, as in the KnowEdit paper) and PNG plots: a grouped bar chart per dataset and,
for sequential runs, the curve over T. Every output carries the run's manifest (model, dataset
hashes, strategy configs, versions, seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memedit.evaluation.runner import MANIFEST, _read_jsonl
from memedit.evaluation.suites import Row, suite_for

__all__ = ["aggregate", "load_records", "summarise", "write_reports"]


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every record line under ``out/records`` (all datasets, strategies, modes, ranks), each
    (dataset, mode, strategy, T, record) once: the first line written for it wins (a record
    scored twice, e.g. by a sitting that predates cross-rank resume, is counted once)."""
    lines: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for path in sorted((out / "records").glob("*/*.jsonl")):
        for line in _read_jsonl(path):
            key = (
                line.get("dataset"),
                line.get("mode"),
                line.get("strategy"),
                line.get("T"),
                line.get("index"),
            )
            if key in seen:
                continue
            seen.add(key)
            lines.append(line)
    return lines


def _mean(xs: Iterable[float]) -> float:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(vals) if vals else math.nan


def aggregate(metrics: Sequence[Mapping[str, float]], key: str) -> float:
    """The dataset-level value of `key` over records' metric maps (see module docstring)."""
    if any(key in m for m in metrics):
        return _mean(m[key] for m in metrics if key in m)
    prefix = key + "/"
    per_record = (_mean(v for k, v in m.items() if k.startswith(prefix)) for m in metrics)
    return _mean(per_record)


def summarise(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{dataset: {"single": {strategy: {...}}, "sequential": {strategy: {T: {...}}}}}``, each
    leaf holding the table rows (display scale), n, errors and records/s."""
    groups: dict[tuple[str, str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        key = (line["dataset"], line["mode"], line["strategy"], int(line.get("T", 0)))
        groups[key].append(line)
    out: dict[str, Any] = {}
    for (dataset, mode, strategy, t), items in sorted(groups.items()):
        ok = [i for i in items if "metrics" in i]
        metrics = [i["metrics"] for i in ok]
        rows = {}
        for row in suite_for(dataset).rows:
            v = aggregate(metrics, row.key)
            rows[row.label] = None if math.isnan(v) else round(v * row.scale, 2)
        seconds = sum(float(i.get("eval_s", 0)) + float(i.get("edit_s", 0)) for i in ok)
        leaf = {
            "rows": rows,
            "n": len(ok),
            "errors": len(items) - len(ok),
            "records_per_s": round(len(ok) / seconds, 3) if seconds else None,
        }
        if mode == "sequential":
            leaf["edit_s_total"] = max(float(i.get("edit_s_total", 0)) for i in ok) if ok else 0
        slot = out.setdefault(dataset, {}).setdefault(mode, {}).setdefault(strategy, {})
        if mode == "sequential":
            slot[str(t)] = leaf
        else:
            slot.update(leaf)
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _rows(dataset: str) -> tuple[Row, ...]:
    return suite_for(dataset).rows


def _single_table(dataset: str, per_strategy: Mapping[str, Any]) -> list[list[str]]:
    strategies = list(per_strategy)
    table = [["Metric", *strategies]]
    for row in _rows(dataset):
        vals = [per_strategy[s]["rows"].get(row.label) for s in strategies]
        if all(v is None for v in vals):
            continue
        label = row.label + (" (lower is better)" if row.lower_is_better else "")
        table.append([label, *(_fmt(v) for v in vals)])
    table.append(["n records", *(str(per_strategy[s]["n"]) for s in strategies)])
    return table


def _md(table: Sequence[Sequence[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _manifest_lines(manifest: Mapping[str, Any]) -> list[str]:
    ds = ", ".join(
        f"{k} ({v['split'] + ' file, ' if 'split' in v else ''}sha256 {v['sha256'][:12]}…)"
        for k, v in manifest["datasets"].items()
    )
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    strategies = json.dumps(manifest.get("strategies", {}), sort_keys=True)
    unrelated = manifest.get("unrelated")
    extra = []
    if unrelated:  # only runs with --unrelated (earlier reports keep their lines)
        first, last = unrelated["records"]
        extra = [
            f"- unrelated locality: {unrelated['source']}, the questions of records "
            f"{first}–{last} of {Path(unrelated['file']).name} "
            f"(sha256 {unrelated['sha256'][:12]}…)"
        ]
    placed = {s: v.get("layers", v.get("layer")) for s, v in manifest.get("settings", {}).items()}
    layers = {s: v for s, v in placed.items() if v is not None}
    if layers:  # runs since manifests keep resolved settings (all of them: summary.json)
        extra.append("- layers: " + "; ".join(f"{s} {v}" for s, v in layers.items()))
    return [
        f"- model: {manifest['model']} (weights sha256 {manifest['model_digest'][:12]}…); "
        f"scope: {manifest.get('scope')}; counterfactual: {manifest.get('counterfactual')}",
        f"- datasets: {ds}",
        f"- mode: {manifest['mode']}"
        + (f", T = {manifest['sequential']}" if manifest.get("sequential") else "")
        + (f", {manifest['edit_batch']} records per edit" if manifest.get("edit_batch") else "")
        + f"; limit: {manifest.get('limit')}; seed: {manifest['seed']}",
        f"- strategies: {strategies}",
        f"- options: {json.dumps(manifest.get('options', {}), sort_keys=True)}",
        *extra,
        f"- versions: {versions}",
    ]


def write_reports(out: str | Path) -> dict[str, Path]:
    """Write summary.json/.md/.csv and plots into `out`; returns their paths by kind."""
    root = Path(out)
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    summary = summarise(load_records(root))
    paths = {"json": root / "summary.json", "md": root / "summary.md", "csv": root / "summary.csv"}
    paths["json"].write_text(
        json.dumps({"manifest": manifest, "summary": summary}, indent=2), encoding="utf-8"
    )
    md = ["# memedit evaluation", "", *_manifest_lines(manifest), ""]
    buf = io.StringIO()
    writer = csv.writer(buf)
    for line in _manifest_lines(manifest):
        buf.write("# " + line[2:] + "\n")
    writer.writerow(["dataset", "mode", "T", "metric", "strategy", "value", "n"])
    for dataset, modes in summary.items():
        if "single" in modes:
            md += [f"## {dataset}", "", _md(_single_table(dataset, modes["single"])), ""]
            for s, leaf in modes["single"].items():
                for label, v in leaf["rows"].items():
                    writer.writerow([dataset, "single", "", label, s, _fmt(v), leaf["n"]])
        for s, by_t in modes.get("sequential", {}).items():
            ts = sorted(by_t, key=int)
            table = [["Metric", *(f"T={t}" for t in ts)]]
            for row in _rows(dataset):
                vals = [by_t[t]["rows"].get(row.label) for t in ts]
                if any(v is not None for v in vals):
                    table.append([row.label, *(_fmt(v) for v in vals)])
            md += [f"## {dataset}, sequential, {s}", "", _md(table), ""]
            for t in ts:
                for label, v in by_t[t]["rows"].items():
                    writer.writerow([dataset, "sequential", t, label, s, _fmt(v), by_t[t]["n"]])
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    paths["csv"].write_text(buf.getvalue(), encoding="utf-8")
    paths.update(_plots(root, summary, manifest))
    return paths


def _plots(root: Path, summary: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {
        "Title": "memedit evaluation",
        "Description": json.dumps(
            {
                k: manifest.get(k)
                for k in (
                    "model",
                    "model_digest",
                    "datasets",
                    "strategies",
                    "seed",
                    "versions",
                    "mode",
                )
            }
        ),
    }
    out: dict[str, Path] = {}
    folder = root / "plots"
    folder.mkdir(exist_ok=True)
    for dataset, modes in summary.items():
        if "single" in modes:
            per = modes["single"]
            rows = [r for r in _rows(dataset) if r.scale == 100.0 and not r.lower_is_better]
            rows = [r for r in rows if any(per[s]["rows"].get(r.label) is not None for s in per)]
            fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows)), 4))
            width = 0.8 / max(1, len(per))
            for j, s in enumerate(per):
                vals = [per[s]["rows"].get(r.label) or 0.0 for r in rows]
                ax.bar([i + j * width for i in range(len(rows))], vals, width, label=s)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
            ax.set_xticklabels([r.label for r in rows], rotation=25, ha="right", fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_ylabel("%")
            ax.set_title(f"{dataset} — {manifest['model']}, single editing")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = folder / f"{dataset}.png"
            fig.savefig(path, dpi=110, metadata=meta)
            plt.close(fig)
            out[f"bar:{dataset}"] = path
        if "sequential" in modes:
            path = folder / f"{dataset}-sequential.png"
            title = f"{dataset} — {manifest['model']}, sequential editing"
            plot_curves(path, title, modes["sequential"], CURVE_LABELS, meta)
            out[f"curve:{dataset}"] = path
    return out


#: The rows a sequential curve plots (those a run has).
CURVE_LABELS = ("Edit Succ.", "Generalization", "Locality", "Locality (unrelated)")


_MARKERS = ("o", "s", "^", "D")
_DASHES = ("-", "--", ":", "-.")


def _series_style(k: int) -> dict[str, str]:
    """The k-th series' line: ten colours, then the same colours with another marker and
    dash, so no two of up to forty series look alike (and each keeps its look in every panel)."""
    turn = (k // 10) % len(_MARKERS)
    return {"color": f"C{k % 10}", "marker": _MARKERS[turn], "linestyle": _DASHES[turn]}


def plot_curves(
    path: Path,
    title: str,
    series: Mapping[str, Mapping[str, Any]],
    labels: Sequence[str],
    meta: Mapping[str, str],
    *,
    panels: bool = False,
) -> None:
    """Plot sequential curves (figure at ``path``): for each strategy of ``series`` (its
    summary by T) and each of ``labels`` it has, the metric against T on a log axis; one axis
    for all, or with ``panels`` one axis per label, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(series) + 1) // 2 if panels else 0  # legend rows below the panels
    fig, axes = plt.subplots(
        1,
        len(labels) if panels else 1,
        figsize=(5.5 * len(labels) if panels else 6, 4 + 0.25 * rows),
    )
    axes = list(axes) if panels else [axes]
    for i, label in enumerate(labels):
        ax = axes[i if panels else 0]
        for k, (s, by_t) in enumerate(series.items()):
            ts = sorted(by_t, key=int)
            ys = [by_t[t]["rows"].get(label) for t in ts]
            if any(y is not None for y in ys):
                ax.plot(
                    [int(t) for t in ts],
                    [y if y is not None else math.nan for y in ys],
                    label=s if panels else f"{s}: {label}",
                    **_series_style(k),
                )
    for i, ax in enumerate(axes):
        ax.set_xscale("log")
        ax.set_xlabel("T (edits applied)")
        ax.set_ylabel(f"{labels[i]} (%)" if panels else "%")
        ax.set_ylim(0, 100)
    if panels:  # one legend for all panels, below them
        handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=7)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.25 * rows / (4 + 0.25 * rows) + 0.02, 1, 1))
    else:
        axes[0].set_title(title)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=dict(meta))
    plt.close(fig)
