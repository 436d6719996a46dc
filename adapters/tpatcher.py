"""T-Patcher (Huang et al., 2023, "Transformer-Patcher: One Mistake worth One Neuron"): each edit
adds neurons to one feed-forward layer (by default the last block's, as in the paper).

A neuron is a key ``k``, a bias ``b`` and a value ``v``: with ``a`` the FFN's input at a token,
the FFN's output there gains ``relu(a . k + b) * v``. The model's weights are never written;
the patches act through `memedit.hooks` only while :meth:`TPatcherAdapter.active` is entered
(no patch committed: no hook at all). Two deviations from the paper: ReLU where the paper uses
the FFN's own activation, so a neuron whose pre-activation is negative adds exactly nothing
and the inputs it stays silent on run bit for bit as unedited; and, with ``per_token`` (the
default), one neuron per target token, each keyed to the position that predicts its token:
one value vector cannot push different tokens at different positions, and on SmolLM2 a
single neuron misses such multi-token answers (``critically threatened``: no token right).
``per_token=False`` trains the paper's one neuron per edit.

Training (Adam on the keys, biases and values alone, the model frozen, every committed patch
active), with ``z = a . k + b``:

* edit loss: the target's negative log-likelihood, teacher-forced after the prompt (the
  neurons act at the positions that predict the target: the prompt's last token and the
  target's own tokens but the last);
* activation loss ``mean exp(-z)`` of each neuron at its own position, so it fires on the
  edit's input;
* memory loss ``mean exp(z_m - bound) + mean exp(z_m - min z_own)`` over the tokens of a
  memory of unrelated inputs, so the neurons stay below ``bound`` there and below their
  activation on the edit (the paper's two memory terms as we read them; ``bound`` defaults
  to 0, where ReLU is exactly silent). The memory: built-in sentences, the edit's subject in a
  few neutral contexts (the subject alone is not the edit), the locality and edit questions
  with their answers of the first ``memory_size`` records of the ``memory_dataset``'s *train*
  file (never the dev records evaluated), and the inputs of every committed patch's edit (a
  new patch stays silent on the old edits, as in the paper);
* with ``quiet_after`` (ours), ``mean exp(z_a - bound)`` at the target's last token: there,
  in generation, the token after the answer is predicted, and a neuron firing says part of the
  answer again.

The total is ``edit + act_weight * activation + memory_weight * memory``; it stops once every
target token has probability >= ``stop_prob``, every neuron fires at its position and all are
silent (``z < bound``) on every memory token (and after the answer), or after ``steps``. Keys
and values are trained in units of the inputs' and outputs' scale (one learning rate fits every
layer and model). When the patched FFN is the last block's, training runs only the final norm
and the output head on the block's cached output (checked once per edit against the model's
own forward with a test patch; any other model or layer runs the whole forward).

Each patch is one payload (JSON header + safetensors body: keys, biases, values and the edit's
inputs); rolling an edit back removes its neurons, so the adapter answers exactly as if it had
never been committed. Non-finite patches are refused, in training and on commit.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memedit.errors import IntegrityError, InvalidRequestError
from memedit.hooks import edit_output_given_input

from .api import (
    AdapterError,
    NonFiniteAdapterError,
    check_hparams,
    register_adapter,
    resolve_layer,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from memedit.types import EditRequest

__all__ = ["Patch", "TPatcherAdapter", "TPatcherHparams", "patch_from_bytes", "patch_to_bytes"]

log = logging.getLogger(__name__)

_MAGIC = b"MEMEDIT-TPATCHER\x00"
FORMAT = 1

#: Unrelated inputs every patch must stay silent on (with the train file's questions).
MEMORY_TEXTS = (
    "The weather today is mild with a light breeze.",
    "How many legs does a spider have? Eight.",
    "Who wrote the novel discussed in class yesterday?",
    "Flour, sugar, two eggs and some butter.",
    "What is the capital of Japan? Tokyo.",
    "The meeting was moved to Thursday afternoon.",
    "Which river flows through Paris? The Seine.",
    "She plays the violin in a small orchestra.",
)
#: Neutral contexts of the edit's subject (the subject alone must not fire the patch).
SUBJECT_CONTEXTS = ("{}", "Tell me about {}.", "{} is", "Here is some text about {}.")
_MAX_TOKENS = 48  # memory texts are cut to this many tokens


@dataclass(frozen=True)
class TPatcherHparams:
    """``layer``: the block whose FFN gets the patches (None: ``layer_fraction`` of the depth,
    1.0 = the last block, the paper's); ``act_weight`` / ``memory_weight``: the activation and
    memory losses' weights; ``bound``: the pre-activation the patch must stay below on memory
    tokens (0: exactly silent); ``memory_size``: train records of ``memory_dataset`` whose
    questions join the memory (0: built-in texts and the subject contexts only);
    ``per_token``: one neuron per target token (False: one per edit); ``quiet_after``: a
    silence term of its own (like the memory's) at the target's last token, where generation
    goes on once the answer is out, so no neuron fires there and the answer is not said again;
    Adam with ``lr`` (keys and biases) and ``value_lr`` for at most ``steps`` steps, stopping
    once every target token has probability >= ``stop_prob`` and the activation constraints
    hold. Defaults: on
    SmolLM2-135M with 8 ZsRE dev edits, 60 steps at ``lr`` 0.02 left the patch firing at the
    last token of 170 of 320 unrelated (train-file) questions; 100 steps at 0.05 of 5, with the
    edits and their rephrasings as right."""

    layer: int | None = None
    layer_fraction: float = 1.0
    act_weight: float = 1.0
    memory_weight: float = 1.0
    bound: float = 0.0
    memory_size: int = 64
    memory_dataset: str = "ZsRE"
    per_token: bool = True
    quiet_after: bool = True
    steps: int = 100
    lr: float = 0.05
    value_lr: float = 0.05
    stop_prob: float = 0.9

    def __post_init__(self) -> None:
        def pos(v: float) -> bool:
            return math.isfinite(v) and v > 0.0

        checks = {
            "layer_fraction": 0.0 <= self.layer_fraction <= 1.0,
            "act_weight": math.isfinite(self.act_weight) and self.act_weight >= 0.0,
            "memory_weight": math.isfinite(self.memory_weight) and self.memory_weight >= 0.0,
            "bound": math.isfinite(self.bound) and self.bound <= 0.0,
            "memory_size": isinstance(self.memory_size, int) and self.memory_size >= 0,
            "per_token": isinstance(self.per_token, bool),
            "quiet_after": isinstance(self.quiet_after, bool),
            "memory_dataset": isinstance(self.memory_dataset, str)
            and bool(self.memory_dataset.strip()),
            "steps": isinstance(self.steps, int) and self.steps >= 0,
            "lr": pos(self.lr),
            "value_lr": pos(self.value_lr),
            "stop_prob": 0.0 < self.stop_prob < 1.0,
        }
        check_hparams("TPatcherHparams", self.layer, checks, self)

    def layer_for(self, model: nn.Module) -> int:
        from memedit.spec import n_layers

        return resolve_layer("TPatcherHparams", self.layer, self.layer_fraction, n_layers(model))

    def placement(self, model: nn.Module) -> dict[str, Any]:
        """Where an edit with these settings goes on ``model`` (the default layer resolved)."""
        return {"layer": self.layer_for(model)}


@dataclass(frozen=True)
class Patch:
    """One edit's neurons at ``module`` (an FFN), one row each: keys (FFN input width),
    biases, values (FFN output width), all float32, and ``queries``: the FFN inputs at the
    edit's positions (rows)."""

    module: str
    key: torch.Tensor
    bias: torch.Tensor
    value: torch.Tensor
    queries: torch.Tensor
    label: str = ""

    def __post_init__(self) -> None:
        import torch

        tensors = {"key": self.key, "bias": self.bias, "value": self.value, "queries": self.queries}
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                msg = f"T-Patcher patch at {self.module} has NaN/Inf in its {name}; refused"
                raise NonFiniteAdapterError(msg)
        n = self.key.shape[0] if self.key.dim() == 2 else -1
        shapes_ok = (
            n >= 1
            and self.bias.shape == (n,)
            and self.value.dim() == 2
            and self.value.shape[0] == n
            and self.queries.dim() == 2
            and self.queries.shape[1] == self.key.shape[1]
        )
        if not shapes_ok:
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
            msg = f"T-Patcher patch at {self.module} has inconsistent shapes {shapes}"
            raise InvalidRequestError(msg, field="patch", value=self.module)

    @property
    def neurons(self) -> int:
        return int(self.key.shape[0])


class _Bank:
    """The patches of one FFN stacked in edit-id order, on the model's device."""

    def __init__(self, patches: Sequence[Patch], device: torch.device) -> None:
        import torch

        self.keys = torch.cat([p.key for p in patches]).to(device)
        self.bias = torch.cat([p.bias for p in patches]).to(device)
        self.values = torch.cat([p.value for p in patches]).to(device)

    def apply(self, inputs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus every firing patch's value; ``out`` itself where none fires."""
        import torch

        act = torch.relu(inputs.to(torch.float32) @ self.keys.T + self.bias)
        if not bool((act > 0).any()):
            return out
        return out + (act @ self.values).to(out.dtype)


class TPatcherAdapter:
    """T-Patcher's neurons on one model; see the module docstring."""

    hparams_type: ClassVar[type[TPatcherHparams]] = TPatcherHparams

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._patches: dict[int, Patch] = {}
        self._banks: dict[str, _Bank] = {}
        self._memory: dict[tuple[Any, ...], torch.Tensor] = {}  # captured memory inputs

    # ------------------------------------------------------------------ state
    def edit_ids(self) -> list[int]:
        return sorted(self._patches)

    def __len__(self) -> int:
        return len(self._patches)

    def patch(self, edit_id: int) -> Patch:
        return self._patches[edit_id]

    def commit(self, edit_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Add patches (all or none) under their edit ids."""
        from memedit.spec import hidden_size

        if len(edit_ids) != len(payloads):
            msg = f"{len(edit_ids)} edit ids but {len(payloads)} payloads"
            raise InvalidRequestError(msg, field="payloads", value=len(payloads))
        patches = [patch_from_bytes(p) for p in payloads]
        width = hidden_size(self.model)
        for edit_id, patch in zip(edit_ids, patches, strict=True):
            if edit_id in self._patches:
                msg = f"T-Patcher edit {edit_id} is already committed"
                raise InvalidRequestError(msg, field="edit_id", value=edit_id)
            self.model.get_submodule(patch.module)  # a bad module path fails before any change
            if patch.key.shape[1] != width or patch.value.shape[1] != width:
                msg = f"T-Patcher patch for {patch.module} does not fit a {width}-wide model"
                raise IntegrityError(msg)
        for edit_id, patch in zip(edit_ids, patches, strict=True):
            self._patches[edit_id] = patch
        self._banks.clear()

    def remove(self, edit_id: int) -> None:
        if edit_id not in self._patches:
            msg = f"T-Patcher edit {edit_id} is not in this adapter"
            raise AdapterError(msg)
        del self._patches[edit_id]
        self._banks.clear()

    def _bank(self, module: str) -> _Bank | None:
        bank = self._banks.get(module)
        if bank is not None and bank.keys.device != self._device():  # the model was moved
            del self._banks[module]
        if module not in self._banks:
            patches = [p for _, p in sorted(self._patches.items()) if p.module == module]
            if not patches:
                return None
            self._banks[module] = _Bank(patches, self._device())
        return self._banks[module]

    # ------------------------------------------------------------------ inference
    @contextmanager
    def active(self) -> Iterator[TPatcherAdapter]:
        """Hook every patched FFN while the block runs; removed on exit, also on an exception.
        No patch: no hook at all."""
        with ExitStack() as stack:
            for module in sorted({p.module for p in self._patches.values()}):
                bank = self._bank(module)
                if bank is not None:
                    stack.enter_context(edit_output_given_input(self.model, module, bank.apply))
            yield self

    # ------------------------------------------------------------------ training
    def prepare(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: Any = None,
    ) -> list[bytes]:
        """Train one patch per request, each with the committed patches active; nothing is
        activated here. NonFiniteAdapterError if training diverges."""
        from memedit.intrinsic.compute import mlp_out_name
        from memedit.intrinsic.hparams import from_options

        hp = from_options(TPatcherHparams, hparams)
        layer = hp.layer_for(self.model)
        module = mlp_out_name(self.model, layer).rsplit(".", 1)[0]  # the FFN itself
        return [patch_to_bytes(self._train(tokenizer, r, hp, module, layer)) for r in requests]

    def _train(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        hp: TPatcherHparams,
        module: str,
        layer: int,
    ) -> Patch:
        import torch

        from memedit.intrinsic.compute import frozen, target_batch

        device = self._device()
        batch = target_batch(tokenizer, [(request.prompt, request.target_new)], device)
        memory = torch.cat(
            [self._pool(tokenizer, module, hp), self._subject_rows(tokenizer, module, request)]
            + [p.queries.to(device) for p in self._patches.values() if p.module == module]
        )
        # the FFN input once the whole answer has been read: its own term, not one memory row
        # among thousands in a mean
        after = torch.zeros((0, memory.shape[1]), device=device)
        if hp.quiet_after:
            full = f"{request.prompt} {request.target_new}"
            after = self._inputs(tokenizer, module, [full])[-1:]
        with frozen(self.model):
            run, queries = self._runner(batch, module, layer)
            # one neuron per target position (its "own"), or one for them all
            own = queries if hp.per_token else queries.mean(0, keepdim=True)
            n = own.shape[0]
            mu = memory.mean(0)
            gap = own - mu
            key_scale = gap.norm(dim=1, keepdim=True).clamp_min(1e-6)
            # k . (own - mu) = 2 and z(mu) = -1: each neuron starts on its position, off the mean
            key_u = (2.0 * gap / key_scale).clone().requires_grad_(True)
            bias = (-1.0 - (key_u.detach() @ mu) / key_scale[:, 0]).clone().requires_grad_(True)
            value_u = torch.zeros((n, run.scale.shape[0]), device=device, requires_grad=True)
            opt = torch.optim.Adam(
                [
                    {"params": [key_u, bias], "lr": hp.lr},
                    {"params": [value_u], "lr": hp.value_lr},
                ]
            )
            rows = torch.arange(queries.shape[0], device=device)
            mine = rows if hp.per_token else torch.zeros_like(rows)  # each position's neuron
            floor = math.log(hp.stop_prob)
            steps = 0
            for steps in range(hp.steps + 1):
                key = key_u / key_scale
                z_edit = queries @ key.T + bias  # (positions, neurons)
                z_own = z_edit[rows, mine]
                z_mem = memory @ key.T + bias
                z_after = after @ key.T + bias
                value = value_u * run.scale
                token_lp = run.token_logprobs(torch.relu(z_edit) @ value)
                loss_act = _exp(-z_own).mean()
                loss_mem = _exp(z_mem - hp.bound).mean() + _exp(z_mem - z_own.min()).mean()
                if after.shape[0]:
                    loss_mem = loss_mem + _exp(z_after - hp.bound).mean()
                loss = -token_lp.mean() + hp.act_weight * loss_act + hp.memory_weight * loss_mem
                if not torch.isfinite(loss):
                    bad = float(loss.detach())
                    msg = f"T-Patcher training of {request.prompt!r} diverged (loss {bad})"
                    raise NonFiniteAdapterError(msg)
                done = (
                    float(token_lp.detach().min()) >= floor
                    and float(z_own.detach().min()) > 0.0
                    and float(z_mem.detach().max()) < hp.bound
                    and (not after.shape[0] or float(z_after.detach().max()) < hp.bound)
                )
                if done or steps == hp.steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        log.debug(
            "T-Patcher for %r: %d neuron(s), %d steps, loss %.4f, edit z >= %.3f, memory z <= %.3f",
            request.prompt,
            n,
            steps,
            float(loss.detach()),
            float(z_own.detach().min()),
            float(z_mem.detach().max()),
        )
        return Patch(
            module=module,
            key=(key_u / key_scale).detach().to("cpu", torch.float32),
            bias=bias.detach().to("cpu", torch.float32),
            value=(value_u * run.scale).detach().to("cpu", torch.float32),
            queries=queries.detach().to("cpu", torch.float32),
            label=request.target_new.strip(),
        )

    def _runner(self, batch: Any, module: str, layer: int) -> tuple[_Runner, torch.Tensor]:
        """The edit's FFN inputs at the target positions, and how to get the target's
        log-probabilities with a new patch's activations there times a value."""
        import torch

        from memedit.hooks import trace
        from memedit.intrinsic.compute import block_name, forward_logits

        block = block_name(self.model, layer)
        with (
            torch.no_grad(),
            self.active(),
            trace(self.model, [module], inputs=True) as ins,
            trace(self.model, [block]) as outs,
        ):
            reference = forward_logits(self.model, batch.ids, batch.mask, batch.keep)
        queries = ins.inputs[module][batch.keep].to(torch.float32)
        hidden = outs[block][batch.keep].to(torch.float32)
        scale = hidden.pow(2).mean().sqrt().clamp_min(1e-6) * torch.ones_like(hidden[0])
        full = _FullRunner(self, batch, module, scale)
        head = _head(self.model, layer)
        if head is not None:
            short = _HeadRunner(head, batch, hidden, scale)
            if short.matches(full, reference):
                return short, queries
        return full, queries

    # ------------------------------------------------------------------ memory
    def _pool(
        self, tokenizer: PreTrainedTokenizerBase, module: str, hp: TPatcherHparams
    ) -> torch.Tensor:
        """FFN inputs at every token of the memory texts (captured once per setting)."""
        others = tuple(sorted(i for i, p in self._patches.items() if p.module != module))
        key = (id(tokenizer), module, hp.memory_dataset, hp.memory_size, others)
        if key not in self._memory:
            texts = list(MEMORY_TEXTS) + _train_texts(hp.memory_dataset, hp.memory_size)
            self._memory[key] = self._inputs(tokenizer, module, texts)
        return self._memory[key]

    def _subject_rows(
        self, tokenizer: PreTrainedTokenizerBase, module: str, request: EditRequest
    ) -> torch.Tensor:
        import torch

        if not request.subject.strip():
            return torch.zeros((0, self._width()), device=self._device())
        texts = [c.format(request.subject) for c in SUBJECT_CONTEXTS]
        return self._inputs(tokenizer, module, texts)

    def _inputs(
        self, tokenizer: PreTrainedTokenizerBase, module: str, texts: Sequence[str]
    ) -> torch.Tensor:
        import torch

        from memedit.intrinsic.compute import capture, encode, pad_id, pad_right

        rows: list[torch.Tensor] = []
        seqs = [encode(tokenizer, t)[:_MAX_TOKENS] for t in texts if t.strip()]
        for start in range(0, len(seqs), 16):
            ids, mask = pad_right(seqs[start : start + 16], pad_id(tokenizer), self._device())
            with self.active():
                inputs, _ = capture(self.model, module, ids, mask)
            rows.append(inputs[mask.bool()].to(torch.float32))
        if not rows:
            return torch.zeros((0, self._width()), device=self._device())
        return torch.cat(rows)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _width(self) -> int:
        from memedit.spec import hidden_size

        return hidden_size(self.model)


class _Runner:
    """The target tokens' log-probabilities with ``added`` (one row per target position) added
    to the FFN's output at those positions; ``scale``: the outputs' scale (one per channel)."""

    scale: torch.Tensor

    def token_logprobs(self, added: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _FullRunner(_Runner):
    """The model's whole forward, ``added`` put into the FFN's output by a hook."""

    def __init__(self, owner: TPatcherAdapter, batch: Any, module: str, scale: torch.Tensor):
        self.owner, self.batch, self.module, self.scale = owner, batch, module, scale

    def token_logprobs(self, added: torch.Tensor) -> torch.Tensor:
        import torch

        from memedit.hooks import edit_output
        from memedit.intrinsic.compute import forward_logits

        batch = self.batch
        where = batch.keep.nonzero(as_tuple=True)

        def add(out: torch.Tensor) -> torch.Tensor:
            extra = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            return out + extra.index_put(where, added).to(out.dtype)

        with self.owner.active(), edit_output(self.owner.model, self.module, add):
            logits = forward_logits(self.owner.model, batch.ids, batch.mask, batch.keep)
        return torch.log_softmax(logits.float(), dim=-1)[batch.tgt_index, batch.tgt_token]


class _HeadRunner(_Runner):
    """The last block's cached output at the target positions, plus ``added``, through the
    final norm and the output head only."""

    def __init__(self, head: Any, batch: Any, hidden: torch.Tensor, scale: torch.Tensor):
        self.head, self.batch, self.hidden, self.scale = head, batch, hidden, scale

    def token_logprobs(self, added: torch.Tensor) -> torch.Tensor:
        import torch

        norm, lm_head = self.head
        x = self.hidden + added
        logits = lm_head(norm(x.to(next(lm_head.parameters()).dtype)))
        batch = self.batch
        return torch.log_softmax(logits.float(), dim=-1)[batch.tgt_index, batch.tgt_token]

    def matches(self, full: _FullRunner, reference: torch.Tensor) -> bool:
        """Does the shortcut give the model's own log-probabilities, unpatched and with a test
        patch (a post-FFN norm or logit soft-capping would break it)?"""
        import torch

        with torch.no_grad():
            lp0 = torch.log_softmax(reference.float(), dim=-1)
            lp0 = lp0[self.batch.tgt_index, self.batch.tgt_token]
            test = torch.linspace(-1.0, 1.0, self.hidden.numel(), device=self.hidden.device)
            test = test.view_as(self.hidden) * self.scale
            pairs = [
                (self.token_logprobs(torch.zeros_like(test)), lp0),
                (self.token_logprobs(test), full.token_logprobs(test)),
            ]
        ok = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in pairs)
        if not ok:
            log.debug("T-Patcher: the head-only shortcut does not match; full forward passes")
        return ok


def _head(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module] | None:
    """(final norm, output head) when ``layer`` is the last block, else None."""
    from memedit.spec import ensure_spec, n_layers

    if layer != n_layers(model) - 1:
        return None
    spec = ensure_spec(model)
    return model.get_submodule(spec.final_norm), model.get_submodule(spec.lm_head)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp`` with the exponent capped (a far-off token must not overflow the loss)."""
    import torch

    return torch.exp(torch.clamp(x, max=30.0))


def _train_texts(dataset: str, n: int) -> list[str]:
    """Questions with their answers from the first ``n`` records of ``dataset``'s train file:
    their locality prompts, then their edit prompts. None (logged) when the file is missing."""
    if n == 0:
        return []
    from memedit.datasets import load_requests
    from memedit.errors import MemeditError

    try:
        records = load_requests(dataset, split="train", limit=n)
    except (MemeditError, OSError) as exc:
        log.warning("T-Patcher memory: no %s train file (%s); built-in texts only", dataset, exc)
        return []
    texts = [f"{p.prompt} {p.answers[0] if p.answers else ''}" for r in records for p in r.locality]
    texts += [f"{r.prompt} {r.ground_truth[0] if r.ground_truth else ''}" for r in records]
    return [t.strip() for t in texts]


def patch_to_bytes(patch: Patch) -> bytes:
    """One patch as a blob for the edit log (JSON header + safetensors body)."""
    import torch
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "method": "tpatcher",
        "module": patch.module,
        "label": patch.label,
    }
    parts = {"key": patch.key, "bias": patch.bias, "value": patch.value, "queries": patch.queries}
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in parts.items()}
    head = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return _MAGIC + len(head).to_bytes(8, "little") + head + save(tensors)


def patch_from_bytes(blob: bytes) -> Patch:
    """Read :func:`patch_to_bytes`'s blob; IntegrityError if it is not one,
    NonFiniteAdapterError if its numbers are NaN/Inf."""
    from safetensors.torch import load

    start = len(_MAGIC) + 8
    if not isinstance(blob, (bytes, bytearray)) or bytes(blob[: len(_MAGIC)]) != _MAGIC:
        msg = "not a serialised T-Patcher patch (bad magic)"
        raise IntegrityError(msg)
    n = int.from_bytes(blob[len(_MAGIC) : start], "little")
    try:
        meta = json.loads(bytes(blob[start : start + n]).decode("utf-8"))
        tensors = load(bytes(blob[start + n :]))
        if meta.get("format") != FORMAT or meta.get("method") != "tpatcher":
            msg = f"T-Patcher patch format {meta.get('format')!r}; expected {FORMAT}"
            raise IntegrityError(msg)
        module, label = str(meta["module"]), str(meta.get("label", ""))
        key, bias = tensors["key"], tensors["bias"]
        value, queries = tensors["value"], tensors["queries"]
    except IntegrityError:
        raise
    except Exception as exc:  # json, safetensors or a missing field
        msg = f"serialised T-Patcher patch is corrupt: {exc}"
        raise IntegrityError(msg) from exc
    return Patch(module=module, key=key, bias=bias, value=value, queries=queries, label=label)


register_adapter("tpatcher", TPatcherAdapter)
