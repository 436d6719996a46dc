"""Metric suites: what is measured on one benchmark case, shared by every strategy.

A suite computes a case's pre-edit state once (`pre`, cached by the runner) and, after the
strategy applied the case's edits, its metrics (`score`) by querying the wrapped model the way a
user would (`EditableModel.teacher_forced` / `predicted_tokens` / `generate`): whatever the
strategy changed (memory, adapters, weights) is what gets measured.

Record metrics are flat ``{key: value}`` maps. A key ``group/kind`` (``portability/Reasoning``)
is one kind of a grouped metric; :func:`memedit.evaluation.report.summarise` averages a record's
kinds, then the records, as EasyEdit's KnowEdit summary does.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memedit.datasets import EvalCase
from memedit.evaluation.unrelated import check_unrelated, unrelated_probe
from memedit.types import Probe

if TYPE_CHECKING:
    from memedit.editable import EditableModel

__all__ = ["EvalOptions", "FactSuite", "Row", "Suite", "suite_for"]


@dataclass(frozen=True)
class EvalOptions:
    """Knobs shared by all suites. ``fluency_tokens``: length of the text Fluency scores,
    prompt included (EasyEdit's ``max_out_len=100``); ``fluency_top_k``: EasyEdit samples that
    text from the top 5 tokens (seeded per record here), None = greedy; ``generation`` also
    judges answers on real greedy generation (slower, more honest), each given its longest
    expected answer's length plus ``gen_margin`` new tokens, at most ``max_gen_tokens`` (high
    enough for WikiBio's sentence-long targets). ``unrelated`` (fact datasets): also score
    locality on one unrelated question per case, the WISE paper's ZsRE locality ("nq": Natural
    Questions, `memedit.evaluation.unrelated`); None = KnowEdit's locality only."""

    fluency_tokens: int = 100
    fluency_top_k: int | None = 5
    generation: bool = True
    gen_margin: int = 4
    max_gen_tokens: int = 96
    unrelated: str | None = None

    def __post_init__(self) -> None:
        check_unrelated(self.unrelated)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fluency_tokens": self.fluency_tokens,
            "fluency_top_k": self.fluency_top_k,
            "generation": self.generation,
            "gen_margin": self.gen_margin,
            "max_gen_tokens": self.max_gen_tokens,
        }
        if self.unrelated is not None:  # absent when off: earlier runs' manifests and ids hold
            out["unrelated"] = self.unrelated
        return out


@dataclass(frozen=True)
class Row:
    """One line of the summary table: its label, the metric group, and the display scale."""

    label: str
    key: str
    scale: float = 100.0
    lower_is_better: bool = False


Metrics = dict[str, float]


class Suite(Protocol):
    name: str
    rows: tuple[Row, ...]

    def pre(self, em: EditableModel, case: EvalCase, opts: EvalOptions) -> dict[str, Any]: ...

    def score(
        self, em: EditableModel, case: EvalCase, pre: dict[str, Any], opts: EvalOptions
    ) -> Metrics: ...


def _mean(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(vals) if vals else math.nan


def _answered(probes: Sequence[Probe]) -> list[Probe]:
    return [p for p in probes if p.answers and p.answers[0].strip()]


def _gen_tokens(em: EditableModel, answers: Sequence[str], opts: EvalOptions) -> int:
    assert em.tokenizer is not None
    longest = max(
        (len(em.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=1
    )
    return max(1, min(opts.max_gen_tokens, longest + opts.gen_margin))


def _generate_all(
    em: EditableModel, asks: Sequence[tuple[str, Sequence[str]]], opts: EvalOptions
) -> list[str]:
    """Greedy answers to (prompt, expected answers) pairs, each given enough new tokens for
    its longest answer plus a margin; batched. Each stops once its judged line is complete
    (callers read only the first line, with `answer_matches` or `_first_line`)."""
    if not asks:
        return []
    budgets = [_gen_tokens(em, a, opts) for _, a in asks]
    answers = em.generate_batch(
        [p for p, _ in asks], max_new_tokens=budgets, until_answer_line=True
    )
    return [a.text for a in answers]


def fluency_of(em: EditableModel, prompt: str, opts: EvalOptions) -> float:
    """KnowEdit's Fluency of one prompt (×100): n-gram entropy of the prompt continued by the
    wrapper until ``opts.fluency_tokens`` tokens (prompt included), as EasyEdit scores it:
    top-k sampling that runs on past end-of-sequence tokens (EasyEdit's generator has no stop
    token). The continuation is not cut at the first line for in-scope prompts either: the
    entropy of a text grows with its length, so a short answer would score low for being
    short, not for being disfluent."""
    from memedit.metrics_generation import fluency_score, fluency_text, text_n_gram_entropy

    assert em.tokenizer is not None
    budget = opts.fluency_tokens - len(em.tokenizer(prompt)["input_ids"])
    cont = ""
    if budget > 0:
        cont = em.generate(
            prompt,
            max_new_tokens=budget,
            top_k=opts.fluency_top_k,
            first_line=False,
            stop_at_eos=False,
        ).text
    return fluency_score([text_n_gram_entropy(fluency_text(prompt, cont))])


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class FactSuite:
    """Fact datasets (ZsRE, WikiData_*, WikiBio, CounterFact, MQuAKE): KnowEdit's Edit Succ.,
    rephrase generalisation, Portability per kind, Locality per kind and Fluency, each also
    judged on greedy generation when ``opts.generation``. With ``opts.unrelated``, also the
    locality of one unrelated question per case (``unrelated/<kind>``, e.g. ``unrelated/NQ``),
    scored as KnowEdit's Locality is, in calls of its own (KnowEdit's numbers do not change)."""

    name: str = "fact"
    rows: tuple[Row, ...] = (
        Row("Edit Succ.", "edit_succ"),
        Row("Generalization", "rephrase"),
        Row("Portability", "portability"),
        Row("Locality", "locality"),
        Row("Locality (unrelated)", "unrelated"),
        Row("Fluency", "fluency", scale=1.0),
        Row("Edit Succ. (generation)", "gen.edit_succ"),
        Row("Generalization (generation)", "gen.rephrase"),
        Row("Portability (generation)", "gen.portability"),
        Row("Locality (generation)", "gen.locality"),
        Row("Locality (unrelated, generation)", "gen.unrelated"),
    )

    def pre(self, em: EditableModel, case: EvalCase, opts: EvalOptions) -> dict[str, Any]:
        probes = [p for r in case.requests for p in _answered(r.locality)]
        out: dict[str, Any] = {
            "locality_tokens": em.predicted_tokens(
                [p.prompt for p in probes], [p.answers[0] for p in probes]
            )
            if probes
            else []
        }
        if opts.generation:
            out["locality_gen"] = _generate_all(em, [(p.prompt, p.answers) for p in probes], opts)
        if opts.unrelated is not None:
            u = unrelated_probe(opts.unrelated, case.index)
            out["unrelated_tokens"] = em.predicted_tokens([u.prompt], [u.answers[0]])[0]
            if opts.generation:
                out["unrelated_gen"] = _generate_all(em, [(u.prompt, u.answers)], opts)[0]
        return out

    def score(
        self, em: EditableModel, case: EvalCase, pre: dict[str, Any], opts: EvalOptions
    ) -> Metrics:
        from memedit.metrics import locality_agreement

        reqs = case.requests
        edit = [(r.prompt, r.target_new) for r in reqs]
        reph = [(p, r.target_new) for r in reqs for p in r.rephrase]
        port = [(p, p.answers[0]) for r in reqs for p in _answered(r.portability)]
        pairs = edit + reph + [(p.prompt, a) for p, a in port]
        acc = em.teacher_forced([p for p, _ in pairs], [t for _, t in pairs])
        m: Metrics = {"edit_succ": _mean(acc[: len(edit)])}
        if reph:
            m["rephrase"] = _mean(acc[len(edit) : len(edit) + len(reph)])
        by_kind: dict[str, list[float]] = defaultdict(list)
        for (probe, _), v in zip(port, acc[len(edit) + len(reph) :], strict=True):
            by_kind[probe.kind or "portability"].append(v)
        m.update({f"portability/{k}": _mean(v) for k, v in by_kind.items()})

        loc = [p for r in reqs for p in _answered(r.locality)]
        if loc:
            post = em.predicted_tokens([p.prompt for p in loc], [p.answers[0] for p in loc])
            by_kind = defaultdict(list)
            for probe, before, after in zip(loc, pre["locality_tokens"], post, strict=True):
                by_kind[probe.kind or "locality"].append(locality_agreement(before, after))
            m.update({f"locality/{k}": _mean(v) for k, v in by_kind.items()})

        unrelated = None
        if opts.unrelated is not None:
            unrelated = unrelated_probe(opts.unrelated, case.index)
            after = em.predicted_tokens([unrelated.prompt], [unrelated.answers[0]])[0]
            agree = locality_agreement(pre["unrelated_tokens"], after)
            m[f"unrelated/{unrelated.kind}"] = agree

        if opts.fluency_tokens > 0:
            m["fluency"] = fluency_of(em, reqs[0].prompt, opts)

        if opts.generation:
            from memedit.metrics_generation import answer_matches

            asks = [(p, [t]) for p, t in edit + reph] + [
                (p.prompt, list(p.answers)) for p, _ in port
            ]
            asks += [(p.prompt, list(p.answers)) for p in loc]
            gens = _generate_all(em, asks, opts)
            hit = [
                float(answer_matches(g, a, prompt=p)) for g, (p, a) in zip(gens, asks, strict=True)
            ]
            m["gen.edit_succ"] = _mean(hit[: len(edit)])
            if reph:
                m["gen.rephrase"] = _mean(hit[len(edit) : len(edit) + len(reph)])
            at = len(edit) + len(reph)
            by_kind = defaultdict(list)
            for (probe, _), h in zip(port, hit[at : at + len(port)], strict=True):
                by_kind[probe.kind or "portability"].append(h)
            m.update({f"gen.portability/{k}": _mean(v) for k, v in by_kind.items()})
            by_kind = defaultdict(list)
            later = gens[at + len(port) :]
            for probe, before, now in zip(loc, pre.get("locality_gen", []), later, strict=False):
                same = _first_line(now).lower() == _first_line(before).lower()
                by_kind[probe.kind or "locality"].append(float(same))
            m.update({f"gen.locality/{k}": _mean(v) for k, v in by_kind.items()})
            if unrelated is not None:
                ask = (unrelated.prompt, list(unrelated.answers))
                now = _generate_all(em, [ask], opts)[0]
                same = _first_line(now).lower() == _first_line(pre["unrelated_gen"]).lower()
                m[f"gen.unrelated/{unrelated.kind}"] = float(same)
        return m


def suite_for(dataset: str) -> Suite:
    """The suite that scores `dataset` (ConvSent and Sanitation have their own metrics)."""
    if dataset == "ConvSent":
        from memedit.evaluation.suites_special import ConvSentSuite

        return ConvSentSuite()
    if dataset == "Sanitation":
        from memedit.evaluation.suites_special import SanitationSuite

        return SanitationSuite()
    return FactSuite()
