"""Hyperparameters: validation shared by every method, the value-optimisation settings ROME
and MEMIT share, and per-model default layers.

Every method's hyperparameters are a frozen dataclass with a ``layers`` field (``None``: the
default for the model, filled in by :func:`for_model`) and a class attribute ``layer_role``
naming which defaults apply. Defaults measured on a model go in :data:`DEFAULT_LAYERS`, keyed
by ``(config.model_type, number of layers, hidden size)``; other models fall back to fractions
of their depth (``memedit.spec.ModelSpec.edit_layers``, and :data:`FT_DEPTH` for fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from memedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_LAYERS",
    "ValueHparams",
    "as_json",
    "check_float",
    "check_int",
    "default_layers",
    "for_model",
    "from_options",
]

H = TypeVar("H")

#: Measured defaults: (model_type, n_layers, hidden_size) -> layer role -> layers.
DEFAULT_LAYERS: dict[tuple[str, int, int], dict[str, tuple[int, ...]]] = {
    # SmolLM2-135M. MEMIT/AlphaEdit: layers 3-7 (benchmarks/memit_edit.py --limit 20, one
    # batch, λ 5000: 2-5 edits less (Edit Succ. 91 vs 97), 4-8 keeps less locality (48 vs 51)).
    # Causal tracing (`memedit locate`, docs/locate, 200 known facts) puts the MLP effect at the
    # last subject token at window centres 4-5 and recommends ROME 4, MEMIT 1-5. Editing does
    # not follow it: ROME writes the fact at every layer and keeps more locality the deeper it
    # edits (first 40 ZsRE dev records: 66.5 at layer 4, 70.8 at 5, 75-77 at 11-20). ROME stays
    # at 5: one edit at a time (each reverted), 11 does better on all 200 ZsRE /
    # WikiData_counterfact dev records (Edit Succ. +2.8 / +3.5, Locality +5.5 / +3.5), but
    # edits that stay and pile up, as they do in the wrapper, fade twice as fast there (ZsRE,
    # one after another: Edit Succ. 55 / 31 at T = 50 / 100 against 81 / 58 at layer 5;
    # docs/eval/NOTES.md, runs weights-rome-l11-*). FT-L: layer 21, EasyEdit's, where ours
    # gives EasyEdit's FT-L figures to the hundredth; 20 (the 2/3-depth fallback FT-M keeps,
    # which edits CF well enough for its 90 Edit Succ.) trades 3-7 Locality for 4.6 ZsRE Edit
    # Succ.
    ("llama", 30, 576): {"rome": (5,), "memit": (3, 4, 5, 6, 7), "ft-l": (21,)},
}
#: Fine-tuning's fallback depth (EasyEdit's FT-L/FT-M tune layer 21 of Llama-2-7B's 32).
FT_DEPTH = 0.66


def check_int(owner: str, name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{owner}.{name} must be an integer >= {minimum}, got {value!r}"
        raise InvalidRequestError(msg, field=name, value=value)


def check_float(owner: str, name: str, value: object, *, minimum: float = 0.0) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) < minimum:  # type: ignore[arg-type]
        msg = f"{owner}.{name} must be a finite number >= {minimum}, got {value!r}"
        raise InvalidRequestError(msg, field=name, value=value)


def check_layers(owner: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value:
        msg = f"{owner}.layers must be None or a non-empty tuple of layer indices, got {value!r}"
        raise InvalidRequestError(msg, field="layers", value=value)
    for v in value:
        check_int(owner, "layers", v, minimum=0)


def layers_value(value: object) -> tuple[int, ...] | None:
    """Accept 5, "5", "3:4:5", "3+4", [3, 4] for a layers option."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = value.replace("+", ":").replace(",", ":").split(":")
        try:
            return tuple(int(p) for p in parts if p.strip())
        except ValueError:
            msg = f"layers must be integers separated by ':' (e.g. 3:4:5), got {value!r}"
            raise InvalidRequestError(msg, field="layers", value=value) from None
    if isinstance(value, (list, range)):
        return tuple(value)
    return value  # type: ignore[return-value]  # rejected by validation


def check_templates(owner: str, templates: object) -> tuple[str, ...]:
    """``neighbour_templates`` as a tuple, each holding one ``{}`` for the subject; one text
    is split at ``|`` (so ``"The country of {} is|{} is located in"`` from a strategy spec is
    two templates); raises naming ``owner`` otherwise."""
    if isinstance(templates, str):
        templates = tuple(templates.split("|"))
    if not isinstance(templates, (tuple, list)) or not all(
        isinstance(t, str) and t.count("{}") == 1 for t in templates
    ):
        msg = (
            f"{owner}.neighbour_templates must be texts each holding one '{{}}' for the "
            f"subject, got {templates!r}"
        )
        raise InvalidRequestError(msg, field="neighbour_templates", value=templates)
    return tuple(templates)


#: Other questions about the edited subject whose answers the value optimisation keeps (ROME's
#: default, tuned on held-out records; MEMIT and AlphaEdit share it).
NEIGHBOUR_TEMPLATES = ("The country of {} is", "The type of {} is", "{} is located in")


#: What :attr:`ValueHparams.value_dtype` accepts.
VALUE_DTYPES = ("model", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ValueHparams:
    """How the target value is optimised (ROME's ``compute_v``, MEMIT's ``compute_z``).

    Gradient descent (Adam, ``v_lr``, at most ``v_steps`` forward passes) on a vector added to
    the edited module's output at the subject's last token of ``prefix + prompt`` for every
    context prefix, minimising the target's NLL + ``kl_factor`` x KL of the next-token
    distribution after ``"{subject} is a"`` from its unedited value (the subject's "essence") +
    ``neighbour_factor`` x the summed KL of the next-token distributions after each of
    ``neighbour_templates`` (other questions about the same subject, e.g. "The country of
    {} is", read after their last token) + ``after_factor`` x the KL of the distribution
    after ``prompt + " " + target`` (what follows the new answer; an edited model that keeps
    repeating its answer loses Fluency) + ``v_weight_decay`` x ||delta|| / ||v0||²; delta
    is kept within ``clamp_norm_factor`` x ||v0||. It stops early once the target's NLL is
    below ``early_stop_loss`` (ROME tests the whole loss; on a small model the KL term alone
    often stays above the threshold), or, with ``stop_at_argmax``, once every target token
    after every prefixed prompt is the argmax (ENCORE's "most-probable early stopping",
    Gupta et al. 2025: the value is driven no further than the edit needs, so it stays
    smaller and the optimisation takes fewer passes).

    ``bare_until``: above 0, a request's passes start with only its bare prompt (and the KL
    rows); its prefixed prompts join once the bare prompt's NLL is below ``bare_until``, and the
    early stop then tests all of them as usual. The early passes run a fraction of the tokens
    (the prefixed prompts are most of a pass), so the value costs fewer token passes; 0 (the
    default) runs every prompt from the first pass. Measured (BENCHMARKS.md, "The bare prompt
    first"): a MEMIT batch of 100 ZsRE edits a third faster at 0.05, more Edit Succ. and less
    Locality, 4-5 Edit Succ. below the default's trade-off at equal Locality, so it is off.

    Context prefixes: the bare prompt plus ``n_prefixes`` texts sampled from the model itself
    (top-5 sampling, seed ``prefix_seed``, ``prefix_tokens`` new tokens after one of EasyEdit's
    starters "The", "Therefore", "Because", "I", "You"), so nothing is downloaded.

    ``value_dtype``: ``"model"`` runs the passes on the model itself; a dtype name
    (``"bfloat16"``, ``"float16"``, ``"float32"``) runs them on a copy of the model in that
    dtype, made for the call (e.g. bfloat16 on a CPU with AMX or AVX512-BF16, where its
    matrix products are native and faster). Only the optimised change is taken from the copy:
    the returned ``init`` is the model's own output, so a solve sees no cast error.

    ``prefix_cache``: the tokens every row has before its subject are not affected by the
    optimised vector; they are run once and their keys/values reused at every step (same
    result up to float rounding, a fraction of the work). Where the model's attention takes a
    custom 4-D mask (sdpa, eager) the rows are also packed end to end without padding, and
    cut after their last scored token.
    """

    layer_role: ClassVar[str] = "rome"

    layers: tuple[int, ...] | None = None
    v_steps: int = 20
    v_lr: float = 2.0  # EasyEdit uses 0.5 on Llama-2-7B; 2.0 converges in fewer passes here
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    neighbour_templates: tuple[str, ...] = ()
    neighbour_factor: float = 0.0
    after_factor: float = 0.0
    early_stop_loss: float = 0.05
    stop_at_argmax: bool = False
    bare_until: float = 0.0
    n_prefixes: int = 4
    prefix_tokens: int = 5
    prefix_seed: int = 0
    prefix_cache: bool = True
    value_dtype: str = "model"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "layers", layers_value(self.layers))
        check_layers(owner, self.layers)
        check_int(owner, "v_steps", self.v_steps, minimum=1)
        check_float(owner, "v_lr", self.v_lr)
        check_float(owner, "v_weight_decay", self.v_weight_decay)
        check_float(owner, "clamp_norm_factor", self.clamp_norm_factor)
        check_float(owner, "kl_factor", self.kl_factor)
        check_float(owner, "neighbour_factor", self.neighbour_factor)
        check_float(owner, "after_factor", self.after_factor)
        object.__setattr__(
            self, "neighbour_templates", check_templates(owner, self.neighbour_templates)
        )
        check_float(owner, "early_stop_loss", self.early_stop_loss)
        check_float(owner, "bare_until", self.bare_until)
        check_int(owner, "n_prefixes", self.n_prefixes, minimum=0)
        check_int(owner, "prefix_tokens", self.prefix_tokens, minimum=1)
        check_int(owner, "prefix_seed", self.prefix_seed, minimum=0)
        if not isinstance(self.stop_at_argmax, bool):
            msg = f"{owner}.stop_at_argmax must be a bool, got {self.stop_at_argmax!r}"
            raise InvalidRequestError(msg, field="stop_at_argmax", value=self.stop_at_argmax)
        if not isinstance(self.prefix_cache, bool):
            msg = f"{owner}.prefix_cache must be a bool, got {self.prefix_cache!r}"
            raise InvalidRequestError(msg, field="prefix_cache", value=self.prefix_cache)
        if self.value_dtype not in VALUE_DTYPES:
            msg = f"{owner}.value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}"
            raise InvalidRequestError(msg, field="value_dtype", value=self.value_dtype)


def default_layers(model: nn.Module, role: str) -> tuple[int, ...]:
    """Measured default layers for ``role`` on this model, else a fraction of its depth."""
    from memedit.spec import ensure_spec, hidden_size, n_layers

    spec = ensure_spec(model)
    count, width = n_layers(model, spec), hidden_size(model, spec)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    measured = DEFAULT_LAYERS.get((model_type, count, width), {})
    if role in measured:
        return measured[role]
    if spec.rome_layer is not None and role == "rome":
        return (spec.rome_layer,)
    if role in ("rome", "memit"):
        return spec.edit_layers(count, role)  # type: ignore[arg-type]
    return (min(count - 1, round(count * FT_DEPTH)),)


def for_model(hparams: H, model: nn.Module) -> H:
    """``hparams`` with ``layers`` filled in for ``model`` and checked against its depth."""
    from memedit.spec import n_layers

    layers = getattr(hparams, "layers", None)
    role = getattr(hparams, "layer_role", "rome")
    if layers is None:
        layers = default_layers(model, role)
    count = n_layers(model)
    bad = [x for x in layers if not 0 <= x < count]
    if bad:
        msg = f"{type(hparams).__name__}.layers {layers} out of range for a {count}-layer model"
        raise InvalidRequestError(msg, field="layers", value=layers)
    return dataclasses.replace(hparams, layers=tuple(layers))  # type: ignore[type-var]


def from_options(cls: type[H], options: Mapping[str, Any] | H | None) -> H:
    """Build ``cls`` from ``None`` (defaults), an instance, or a mapping of field values
    (``{"layer": 4, "v_steps": 10}`` as a strategy spec's options give them; ``layer`` is
    ``layers`` for one layer). Unknown keys raise, naming the known ones."""
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        msg = f"hparams must be a {cls.__name__} or a mapping, got {type(options).__name__}"
        raise InvalidRequestError(msg, field="hparams", value=options)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = dict(options)
    if "layer" in values and "layer" not in known:
        values["layers"] = layers_value(values.pop("layer"))
    unknown = sorted(set(values) - known)
    if unknown:
        msg = f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}"
        raise InvalidRequestError(msg, field=unknown[0], value=values[unknown[0]])
    return cls(**values)


def as_json(hp: Any) -> dict[str, Any]:
    """A hyperparameter dataclass as plain JSON values (tuples as lists): what a delta's
    metadata and an evaluation run's manifest keep."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(hp).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
