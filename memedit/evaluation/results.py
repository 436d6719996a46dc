"""RESULTS.md: our KnowEdit tables beside the published and the measured reference figures.

For each of the six KnowEdit datasets: rows = metrics, columns = our strategies on our model,
then EasyEdit's own implementations run on the same default model (../shared/ANCHORS.md), then
the paper's Llama-2-7b-chat figures (EasyEdit README), each source named. Sequential runs get
their curve table and plot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from memedit.datasets import KNOWEDIT_DATASETS
from memedit.evaluation.report import _fmt, _manifest_lines, _md, load_records, summarise
from memedit.evaluation.runner import MANIFEST

__all__ = ["reference_tables", "write_results"]

PAPER = "knowedit-reference-llama2-7b-chat.json"
EASYEDIT_HERE = "knowedit-reference-easyedit-smollm2.json"

#: our row label -> the paper's metric label ("Locality (unrelated)", the WISE paper's NQ
#: locality, is a metric of its own: its reference columns stay empty)
_PAPER_ROW = {
    "Edit Succ.": "Edit Succ.",
    "Portability": "Portability",
    "Locality": "Locality",
    "Locality (KL)": "Locality (KL, lower better)",
    "Fluency": "Fluency",
}


def reference_tables() -> tuple[dict[str, Any], dict[str, Any]]:
    """(paper figures for Llama-2-7b-chat, EasyEdit measured on the default model)."""
    data = resources.files("memedit") / "data"
    return (
        json.loads((data / PAPER).read_text(encoding="utf-8")),
        json.loads((data / EASYEDIT_HERE).read_text(encoding="utf-8")),
    )


def _dataset_table(
    dataset: str,
    ours: Mapping[str, Any],
    paper: Mapping[str, Any],
    here: Mapping[str, Any],
    references: bool = True,
) -> list[list[str]]:
    from memedit.evaluation.suites import suite_for

    p_methods: Sequence[str] = paper["methods"] if references else []
    p_rows = paper["datasets"].get(dataset, {})
    h_methods = here["datasets"].get(dataset, {}) if references else {}
    head = ["Metric", *(f"**{s}** (ours)" for s in ours)]
    head += [f"{m} (EasyEdit, same model, n={v['n']})" for m, v in h_methods.items()]
    head += [f"{m} (paper, Llama-2-7b-chat)" for m in p_methods]
    table = [head]
    for row in suite_for(dataset).rows:
        mine = [ours[s]["rows"].get(row.label) for s in ours]
        if all(v is None for v in mine):
            continue
        prow = p_rows.get(_PAPER_ROW.get(row.label, ""), {})
        theirs = [
            _fmt(h_methods[m].get(row.label)) if row.label in _PAPER_ROW else "" for m in h_methods
        ]
        label = row.label + (" ↓" if row.lower_is_better else "")
        table.append(
            [
                label,
                *(_fmt(v) for v in mine),
                *theirs,
                *(_fmt(prow.get(m)) if prow else "" for m in p_methods),
            ]
        )
    table.append(
        [
            "n records",
            *(str(ours[s]["n"]) for s in ours),
            *("" for _ in h_methods),
            *("" for _ in p_methods),
        ]
    )
    return table


#: What the figure of every run's sequential curves on one dataset shows, a panel each.
COMBINED_LABELS = ("Edit Succ.", "Locality")


def write_results(
    dirs: Sequence[str | Path], path: str | Path = "RESULTS.md", notes: str | Path | None = None
) -> Path:
    """Write RESULTS.md from evaluation directories (single and/or sequential runs), followed
    by the Markdown file `notes` (how to read the numbers) when given. Where the runs hold
    sequential curves of more than one strategy on a dataset, one figure puts them side by
    side (``plots/<dataset>-sequential-all.png`` beside the first directory)."""
    paper, here = reference_tables()
    lines = [
        "# Results",
        "",
        "Regenerate with `make eval` (commands in the Makefile). Columns marked *ours* are "
        "measured by `memedit eval` on the model named below; the other columns are reference "
        "figures, not our runs:",
        "",
        f"- EasyEdit, same model: {here['source']}",
        f"- paper: {paper['source']}",
        "",
        "Scales: percentages, except Fluency (n-gram entropy ×100, KnowEdit's scale) and "
        "ConvSent's KL locality (lower is better). Rows marked *(generation)* judge real greedy "
        "answers instead of teacher-forced tokens.",
        "",
    ]
    shown: set[str] = set()  # reference columns once per dataset, beside its first table
    curves: dict[str, dict[str, Any]] = {}  # dataset -> "strategy, run" -> summary by T
    for d in dirs:
        root = Path(d)
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        summary = summarise(load_records(root))
        batch = int(manifest.get("edit_batch") or 1)
        run = f"{root.name}, {batch} per edit" if batch != 1 else root.name
        lines += [f"## Run `{root.name}`", "", *_manifest_lines(manifest), ""]
        order = [ds for ds in KNOWEDIT_DATASETS if ds in summary]
        order += [ds for ds in summary if ds not in order]
        for ds in order:
            modes = summary[ds]
            if "single" in modes:
                table = _dataset_table(ds, modes["single"], paper, here, ds not in shown)
                shown.add(ds)
                lines += [f"### {ds}", "", _md(table)]
                rate = ", ".join(
                    f"{s} {v['records_per_s']} records/s" for s, v in modes["single"].items()
                )
                lines += ["", f"Throughput: {rate}.", ""]
                bars = root / "plots" / f"{ds}.png"
                if bars.is_file():
                    lines += [f"![{ds}]({bars.as_posix()})", ""]
            for s, by_t in modes.get("sequential", {}).items():
                curves.setdefault(ds, {})[f"{s} ({run})"] = by_t
                ts = sorted(by_t, key=int)
                labels = [lbl for lbl in next(iter(by_t.values()))["rows"]]
                table = [["Metric", *(f"T={t}" for t in ts)]]
                for lbl in labels:
                    vals = [by_t[t]["rows"].get(lbl) for t in ts]
                    if any(v is not None for v in vals):
                        table.append([lbl, *(_fmt(v) for v in vals)])
                lines += [f"### {ds}, sequential editing, {s}", "", _md(table), ""]
                plot = root / "plots" / f"{ds}-sequential.png"
                if plot.is_file():
                    lines += [f"![{ds} sequential]({plot.as_posix()})", ""]
    lines += _combined_curves(curves, Path(dirs[0]).parent / "plots" if dirs else None)
    if notes is not None:
        lines += ["", Path(notes).read_text(encoding="utf-8")]
    out = Path(path)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _combined_curves(curves: Mapping[str, Mapping[str, Any]], folder: Path | None) -> list[str]:
    """The figure of every run's sequential curves per dataset (those with two or more), and
    the RESULTS.md lines that show it."""
    from memedit.evaluation.report import plot_curves

    shown = {ds: series for ds, series in curves.items() if len(series) > 1}
    if not shown or folder is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["## Sequential editing, all runs side by side", ""]
    for ds, series in shown.items():
        path = folder / f"{ds}-sequential-all.png"
        title = f"{ds}, sequential editing: every run"
        plot_curves(path, title, series, COMBINED_LABELS, {"Title": title}, panels=True)
        lines += [
            f"{ds}: {'; '.join(series)}",
            "",
            f"![{ds} sequential, all runs]({path.as_posix()})",
            "",
        ]
    return lines
