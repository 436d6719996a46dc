"""`MiniLMScopeClassifier`: frozen MiniLM pair features + a small trained head."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memedit.scope.base import check_candidates, check_query, subject_of
from memedit.scope.encoder import BASE_ENCODER, TokenEncoder, base_encoder_fingerprint
from memedit.scope.features import EditSide, edit_side, n_features, pair_features
from memedit.scope.head import ScopeHead, ScopeHeadError
from memedit.types import EditRequest

log = logging.getLogger(__name__)

#: The shipped head (trained by ``python -m memedit.scope.train``).
DEFAULT_HEAD = Path(__file__).resolve().parents[1] / "data" / "scope-minilm-mlp.json"


class MiniLMScopeClassifier:
    """Scores (query, edit) pairs: is the query asking for the edit's fact?

    The query is encoded once per call (and cached); each edit's side of the features is
    computed once and kept in an LRU cache keyed by its prompt and subject, so scoring k
    candidates costs one short MiniLM forward pass plus k small matrix products.
    """

    name = "minilm-pair-mlp"

    def __init__(
        self,
        encoder: TokenEncoder,
        head: ScopeHead,
        *,
        threshold: float | None = None,
        edit_cache_size: int = 8192,
    ) -> None:
        expected = n_features(encoder.dim)
        if head.n_inputs != expected:
            msg = f"scope head takes {head.n_inputs} features, the encoder gives {expected}"
            raise ScopeHeadError(msg)
        self.encoder = encoder
        self.head = head
        self.threshold = float(head.threshold if threshold is None else threshold)
        self.edit_cache_size = edit_cache_size
        self._edits: OrderedDict[tuple[str, str], EditSide] = OrderedDict()

    def _edit_sides(self, requests: Sequence[EditRequest]) -> list[EditSide]:
        keys = [(r.prompt, subject_of(r)) for r in requests]
        found: dict[tuple[str, str], EditSide] = {}
        for k in keys:
            hit = self._edits.get(k)
            if hit is not None:
                self._edits.move_to_end(k)
                found[k] = hit
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            encoded = self.encoder.encode([p for p, _ in missing])
            for k, enc in zip(missing, encoded, strict=True):
                side = edit_side(enc, k[1])
                found[k] = side
                self._edits[k] = side
            while len(self._edits) > self.edit_cache_size:
                self._edits.popitem(last=False)
        return [found[k] for k in keys]

    @property
    def embedder_name(self) -> str:
        """Identity of `sentence_embedding`, in the form an edit memory's embedder names itself
        (the memory may then search with this vector instead of encoding the query again)."""
        return f"{BASE_ENCODER}/mean-pool/l2/max_tokens=256/dim={self.encoder.dim}"

    def sentence_embedding(self, text: str) -> np.ndarray | None:
        """The L2-normalised mean-pooled MiniLM vector of `text` (the one sentence-transformers
        gives), from the same cached forward pass that scoring uses; None when the text is too
        long for this encoder's window, where the two would differ."""
        enc = self.encoder.encode([check_query(text)])[0]
        if enc.tokens.shape[0] + 2 >= self.encoder.max_length:
            return None
        return enc.sentence

    def prepare(self, requests: Sequence[EditRequest]) -> None:
        """Compute and cache the edit side of `requests` now (e.g. when they are added), so
        the first query that retrieves them pays only for its own encoding."""
        self._edit_sides(check_candidates(requests))

    def features(self, pairs: Sequence[tuple[str, EditRequest]]) -> np.ndarray:
        """The feature matrix of (query, edit) pairs, one row per pair."""
        if not pairs:
            return np.zeros((0, self.head.n_inputs), dtype=np.float32)
        queries = [check_query(q) for q, _ in pairs]
        requests = check_candidates([r for _, r in pairs])
        qenc = dict(zip(queries, self.encoder.encode(queries), strict=True))
        sides = self._edit_sides(requests)
        return np.stack([pair_features(qenc[q], s) for q, s in zip(queries, sides, strict=True)])

    def score_batch(self, pairs: Sequence[tuple[str, EditRequest]]) -> list[float]:
        """One probability per (query, edit) pair.

        Where the head carries a ``question_threshold``, a question-form edit's score is
        moved on the logit scale so that it reaches the head's ``threshold`` exactly when the
        raw probability reaches ``question_threshold``: one threshold then serves both forms.
        """
        if not pairs:
            return []
        probs = self.head.predict(self.features(pairs))
        qt = self.head.question_threshold
        if qt is not None:
            shift = _logit(self.head.threshold) - _logit(qt)
            question = np.array([is_question(r.prompt) for _, r in pairs])
            probs = np.where(question, _sigmoid(_logit_array(probs) + shift), probs)
        return [float(p) for p in probs]

    def score(self, query: str, candidates: Sequence[EditRequest]) -> list[float]:
        """One probability per candidate that `query` asks about its fact."""
        check_query(query)
        return self.score_batch([(query, c) for c in check_candidates(candidates)])


def is_question(prompt: str) -> bool:
    """A question-form edit prompt (ZsRE style: "Who was X's father?"), not a cloze."""
    return prompt.rstrip().endswith("?")


_EPS = 1e-7


def _logit(p: float) -> float:
    q = min(max(p, _EPS), 1.0 - _EPS)
    return float(np.log(q / (1.0 - q)))


def _logit_array(p: np.ndarray) -> np.ndarray:
    q = np.clip(p.astype(np.float64), _EPS, 1.0 - _EPS)
    return np.asarray(np.log(q / (1.0 - q)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0))))


def load_scope_classifier(
    *,
    progress: bool = True,
    path: str | Path | None = None,
    device: str | None = None,
    threshold: float | None = None,
    verify_encoder: bool = True,
) -> MiniLMScopeClassifier:
    """The default scope classifier: the shipped head on the bundled all-MiniLM-L6-v2.

    Nothing is downloaded or trained (loading takes a few seconds). `path` picks another head
    file (from ``python -m memedit.scope.train``); `threshold` overrides its calibrated one.
    `progress` is accepted for symmetry with the other loaders; there is nothing to show.
    """
    head_path = Path(path) if path is not None else DEFAULT_HEAD
    head = ScopeHead.load(head_path)
    encoder = TokenEncoder(device=device)
    if verify_encoder:
        want = head.meta.get("base_encoder_sha256")
        have = base_encoder_fingerprint(encoder.path)
        if want != have:
            msg = (
                f"scope head {head_path} was trained on base encoder sha256 {want!r}, but the "
                f"installed one ({encoder.path}) has {have!r}; retrain it with "
                "`python -m memedit.scope.train`"
            )
            raise ScopeHeadError(msg)
    log.info(
        "scope classifier %s loaded from %s (threshold %.3f)",
        head_path.name,
        head_path,
        head.threshold if threshold is None else threshold,
    )
    del progress
    return MiniLMScopeClassifier(encoder, head, threshold=threshold)
