"""Suites for the two KnowEdit datasets that are not single facts: ConvSent and Sanitation.

ConvSent (EasyEdit ``compute_sent_metric``): Edit Succ. combines the likelihoods of the edit's
target-sentiment answers about its topic against the opposite ones, capped by how much the
on-topic answers lost; Locality is the KL between the pre- and post-edit next-token
distributions on answers about the *next* record's topic (lower is better). Those
distributions are too large to cache (vocabulary × positions), so they come from the runner's
``before_edit`` hook: single mode takes them right before each edit, sequential mode takes them
for every record before the chain of edits and spills them to disk (float32, as computed), so
both compare against the unedited model. Without a local model the hook gives None: no KL.

Sanitation (EasyEdit's sanitisation script): Edit Succ. = the generation after the templated
question contains "I don't know."; Locality = token overlap of post- vs pre-edit generations on
the retain questions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memedit.datasets import EvalCase
from memedit.evaluation.suites import EvalOptions, Metrics, Row, fluency_of

if TYPE_CHECKING:
    from memedit.editable import EditableModel
    from memedit.types import EditRequest

__all__ = ["ConvSentSuite", "SanitationSuite"]

#: new tokens generated for a Sanitation answer (EasyEdit's script)
SANITATION_TOKENS = 10


def _groups(req: EditRequest) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(target-sentiment, opposite) (prompt, answer) pairs about the edited topic."""
    from memedit.metrics import convsent_prompt

    meta = req.meta
    pos, neg = list(meta["pos"]), list(meta["neg"])
    questions = list(meta["inner_questions"])
    pairs = [(convsent_prompt(q), a) for q, a in zip(questions, pos + neg, strict=True)]
    pos_pairs, neg_pairs = pairs[: len(pos)], pairs[len(pos) :]
    if meta["target_sentiment"] == "positive":
        return pos_pairs, neg_pairs
    return neg_pairs, pos_pairs


def _outer(req: EditRequest) -> list[tuple[str, str]]:
    from memedit.metrics import convsent_prompt

    return [(convsent_prompt(p.prompt), p.answers[0]) for p in req.locality if p.answers]


class ConvSentSuite:
    name: str = "convsent"
    rows: tuple[Row, ...] = (
        Row("Edit Succ.", "convsent_succ"),
        Row("Locality (KL)", "convsent_kl", scale=1.0, lower_is_better=True),
        Row("Fluency", "fluency", scale=1.0),
    )

    def pre(self, em: EditableModel, case: EvalCase, opts: EvalOptions) -> dict[str, Any]:
        from memedit.metrics import completion_token_logprobs

        target, _ = _groups(case.requests[0])
        pos_pre = em.score_routed(
            [p for p, _ in target], [a for _, a in target], completion_token_logprobs
        )
        return {"pos_pre": pos_pre}

    def before_edit(self, em: EditableModel, case: EvalCase, opts: EvalOptions) -> Any:
        """The unedited next-token distributions on the outer answers (None without a local
        model: a black-box wrapper gives no distributions, so the record gets no KL)."""
        from memedit.metrics import next_token_logprobs

        if em.model is None:
            return None
        outer = _outer(case.requests[0])
        return em.score_routed([p for p, _ in outer], [a for _, a in outer], next_token_logprobs)

    def score(
        self, em: EditableModel, case: EvalCase, pre: dict[str, Any], opts: EvalOptions
    ) -> Metrics:
        from memedit.metrics import (
            completion_token_logprobs,
            convsent_kl,
            convsent_success,
            next_token_logprobs,
        )

        req = case.requests[0]
        target, opposite = _groups(req)
        pos_post = em.score_routed(
            [p for p, _ in target], [a for _, a in target], completion_token_logprobs
        )
        neg_post = em.score_routed(
            [p for p, _ in opposite], [a for _, a in opposite], completion_token_logprobs
        )
        m: Metrics = {"convsent_succ": convsent_success(pre["pos_pre"], pos_post, neg_post)}
        live = pre.get("_live")
        if live is not None:
            outer = _outer(req)
            post = em.score_routed(
                [p for p, _ in outer], [a for _, a in outer], next_token_logprobs
            )
            m["convsent_kl"] = convsent_kl(live, post)
        if opts.fluency_tokens > 0:
            m["fluency"] = fluency_of(em, req.rephrase[0] if req.rephrase else req.prompt, opts)
        return m


class SanitationSuite:
    name: str = "sanitation"
    rows: tuple[Row, ...] = (
        Row("Edit Succ.", "sanitation_succ"),
        Row("Locality", "sanitation_loc"),
        Row("Fluency", "fluency", scale=1.0),
    )

    def pre(self, em: EditableModel, case: EvalCase, opts: EvalOptions) -> dict[str, Any]:
        probes = case.requests[0].locality
        answers = em.generate_batch([p.prompt for p in probes], max_new_tokens=SANITATION_TOKENS)
        return {"retain_gen": [a.text for a in answers]}

    def score(
        self, em: EditableModel, case: EvalCase, pre: dict[str, Any], opts: EvalOptions
    ) -> Metrics:
        from memedit.metrics_generation import sanitation_hit, sanitation_locality

        assert em.tokenizer is not None
        req = case.requests[0]
        prompts = [req.prompt, *(p.prompt for p in req.locality)]
        answer, *rest = em.generate_batch(prompts, max_new_tokens=SANITATION_TOKENS)
        m: Metrics = {"sanitation_succ": float(sanitation_hit(answer.text, req.target_new))}
        after = [a.text for a in rest]
        if after:
            loc = sanitation_locality(em.tokenizer, pre["retain_gen"], after)
            vals = [v for v in loc if v == v]
            if vals:
                m["sanitation_loc"] = sum(vals) / len(vals)
        if opts.fluency_tokens > 0:
            m["fluency"] = fluency_of(em, req.prompt, opts)
        return m
