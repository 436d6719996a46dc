"""The KnowEdit evaluator: every strategy on the same model, the benchmark's metrics.

    memedit eval --dataset ZsRE --strategies unedited,memory --limit 100 --out eval-out

`run_eval` loads the model and writes per-record JSONL (resumable), `write_reports` the summary
tables and plots, `write_results` the project's RESULTS.md.
"""

from __future__ import annotations

from memedit.evaluation.report import aggregate, load_records, summarise, write_reports
from memedit.evaluation.results import write_results
from memedit.evaluation.runner import EvalConfig, RevertError, evaluate, run_eval
from memedit.evaluation.strategies import parse_strategy, register_strategy, weights_digest
from memedit.evaluation.suites import EvalOptions, suite_for

__all__ = [
    "EvalConfig",
    "EvalOptions",
    "RevertError",
    "aggregate",
    "evaluate",
    "load_records",
    "parse_strategy",
    "register_strategy",
    "run_eval",
    "suite_for",
    "summarise",
    "weights_digest",
    "write_reports",
    "write_results",
]
