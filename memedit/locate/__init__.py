"""Where knowledge lives: causal tracing (ROME paper) and edit layers chosen by measurement.

from memedit.locate import run_locate
doc = run_locate("smollm2-135m", n=200, out=Path("docs/locate"))
doc["recommendation"]     # {"rome_layer": ..., "memit_layers": [...], ...}
"""

from __future__ import annotations

from memedit.locate.run import (
    FACT_SOURCES,
    aggregate,
    embedding_std,
    known_facts,
    load_counterfact_facts,
    load_facts,
    load_known,
    recommend,
    run_locate,
    spec_hint,
    write_heatmaps,
)
from memedit.locate.trace import GROUPS, FactTrace, TraceConfig, group_positions, trace_fact

__all__ = [
    "FACT_SOURCES",
    "GROUPS",
    "FactTrace",
    "TraceConfig",
    "aggregate",
    "embedding_std",
    "group_positions",
    "known_facts",
    "load_counterfact_facts",
    "load_facts",
    "load_known",
    "recommend",
    "run_locate",
    "spec_hint",
    "trace_fact",
    "write_heatmaps",
]
