"""LoRA edits through peft: one low-rank adapter trained per edit (or per batch), merged into
the weights.

Each edit gets its own peft LoRA (``peft.get_peft_model`` on the edited MLP output projection,
by default the middle block's), trained with the model frozen until every target token has
probability >= ``stop_prob``; the adapter is saved in peft's own format (``adapter_config.json``
+ ``adapter_model.safetensors``, zipped as the edit's payload in the edit log; extract it and
``PeftModel.from_pretrained`` reads it) and its delta (peft's ``get_delta_weight``) is merged.
The merged weight of a module is always recomputed as ``base + sum of its active deltas`` (in
edit-id order, in float32) from an exact copy of the base weight, so unmerging an edit (a
rollback) gives bit for bit the weights the model would have without it, and the base weight
itself once none is left. A non-finite merge is refused and nothing is written.

With ``per_batch`` one LoRA is trained on all the requests of an edit call together (one
loss over every target token); the batch's first edit holds the payload and the others a
marker naming them members of it, and rolling back any of them rolls back the whole batch (the
wrapper marks every member rolled back), as with an in-weight batch.

The merged edits are part of the weights: they act on every query (``active()`` hooks nothing).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from memedit.errors import IntegrityError, InvalidRequestError

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

    from memedit.intrinsic.compute import TargetBatch
    from memedit.types import EditRequest

__all__ = ["LoraAdapter", "LoraHparams"]

log = logging.getLogger(__name__)

_META = "memedit.json"
FORMAT = 1
#: The payload of a per-batch edit other than its batch's first (which holds the LoRA).
MEMBER = b"memedit-lora-batch-member:1"


@dataclass(frozen=True)
class LoraHparams:
    """``layer``: the block whose MLP output projection gets the LoRA (None: ``layer_fraction``
    of the depth); ``rank`` / ``alpha``: peft's ``r`` / ``lora_alpha``; Adam with ``lr`` for at
    most ``steps`` steps, stopping once every target token has probability >= ``stop_prob``;
    ``per_batch``: one LoRA for all the requests of an edit call instead of one each;
    ``modules``: ``"mlp_out"`` (the default) trains the MLP output projection of the one block
    ``layer`` names, anything else is a ``+``-separated list of linear-module names trained in
    every block (``"q_proj+v_proj"``, EasyEdit's choice), or in block ``layer`` alone if it is
    set."""

    layer: int | None = None
    layer_fraction: float = 0.5
    rank: int = 8
    alpha: float = 16.0
    steps: int = 60
    lr: float = 1e-2
    stop_prob: float = 0.9
    per_batch: bool = False
    modules: str = "mlp_out"

    def __post_init__(self) -> None:
        names = self.modules.split("+") if isinstance(self.modules, str) else [""]
        checks = {
            "per_batch": isinstance(self.per_batch, bool),
            "modules": all(n.isidentifier() for n in names),
            "layer_fraction": 0.0 <= self.layer_fraction <= 1.0,
            "rank": isinstance(self.rank, int) and self.rank >= 1,
            "alpha": math.isfinite(self.alpha) and self.alpha > 0.0,
            "steps": isinstance(self.steps, int) and self.steps >= 0,
            "lr": math.isfinite(self.lr) and self.lr > 0.0,
            "stop_prob": 0.0 < self.stop_prob < 1.0,
        }
        check_hparams(type(self).__name__, self.layer, checks, self)

    def placement(self, model: nn.Module) -> dict[str, Any]:
        """Where an edit with these settings goes on ``model``: the linear modules it trains."""
        return {"targets": self.modules_for(model)}

    def modules_for(self, model: nn.Module) -> list[str]:
        """The full names of the linear modules an edit's LoRA trains (refused if one of
        ``modules`` names no linear module of a block)."""
        from torch import nn

        from memedit.intrinsic.compute import block_name, mlp_out_name
        from memedit.spec import n_layers

        count = n_layers(model)
        owner = type(self).__name__
        if self.modules == "mlp_out":
            layer = resolve_layer(owner, self.layer, self.layer_fraction, count)
            return [mlp_out_name(model, layer)]
        if self.layer is None:
            blocks: Sequence[int] = range(count)
        else:
            blocks = [resolve_layer(owner, self.layer, 0.0, count)]
        out: list[str] = []
        for layer in blocks:
            block = block_name(model, layer)
            found = {
                name.rpartition(".")[2]: f"{block}.{name}"
                for name, sub in model.get_submodule(block).named_modules()
                if isinstance(sub, nn.Linear)
            }
            for leaf in self.modules.split("+"):
                if leaf not in found:
                    msg = f"{owner}.modules names {leaf!r}, but {block} has no such linear module"
                    raise InvalidRequestError(msg, field="modules", value=self.modules)
                out.append(found[leaf])
        return out


class LoraAdapter:
    """Per-edit peft LoRAs merged into one model's weights; see the module docstring.

    A peft method built on LoRA's layers (AdaLoRA, ``adalora.py``) is a subclass that names
    itself (``method`` / ``title``, its hyperparameters) and overrides what differs: the peft
    config (:meth:`_peft_config`), the training loss (:meth:`_loss`) and what runs after each
    optimiser step (:meth:`_after_step`). Training loop, payload and merging are shared."""

    method: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    hparams_type: ClassVar[type[LoraHparams]] = LoraHparams
    #: merge the deltas peft computes from the saved payload (as a reopened memory does)
    #: rather than from the trained modules; for methods whose saved adapter is not the
    #: trained one verbatim (AdaLoRA saves only the ranks it kept)
    deltas_from_payload: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._base: dict[str, torch.Tensor] = {}  # module -> exact copy of its base weight
        self._written: dict[str, torch.Tensor] = {}  # module -> the weight last merged in
        self._deltas: dict[int, dict[str, torch.Tensor]] = {}  # edit id -> module -> delta
        self._prepared: dict[bytes, dict[str, torch.Tensor]] = {}  # payload -> its deltas
        self._members: dict[int, list[int]] = {}  # per-batch edit id -> its batch's other ids

    def edit_ids(self) -> list[int]:
        return sorted([*self._deltas, *(m for ms in self._members.values() for m in ms)])

    def __len__(self) -> int:
        return len(self.edit_ids())

    def group(self, edit_id: int) -> list[int]:
        """The edit ids rolled back with ``edit_id``: its whole batch when trained per batch."""
        for first, members in self._members.items():
            if edit_id == first or edit_id in members:
                return [first, *members]
        return [edit_id]

    @contextmanager
    def active(self) -> Iterator[LoraAdapter]:
        """Merged edits need no hook: the weights already hold them."""
        yield self

    # ------------------------------------------------------------------ training
    def prepare(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: Any = None,
    ) -> list[bytes]:
        """Train one LoRA per request (or, ``per_batch``, one for all of them: its payload
        first, then :data:`MEMBER` for the rest) on the current weights; nothing is merged."""
        from memedit.intrinsic.hparams import from_options

        hp = from_options(self.hparams_type, hparams)
        modules = hp.modules_for(self.model)
        groups = [list(requests)] if hp.per_batch else [[r] for r in requests]
        out: list[bytes] = []
        for group in groups:
            blob, deltas = self._train(tokenizer, group, hp, modules)
            self._prepared[blob] = deltas
            out += [blob] + [MEMBER] * (len(group) - 1)
        return out

    def _peft_config(self, hp: Any, modules: list[str]) -> Any:
        """The peft config of one edit's adapter on ``modules`` (full module names)."""
        return _peft().LoraConfig(
            r=hp.rank, lora_alpha=hp.alpha, lora_dropout=0.0, target_modules=modules, bias="none"
        )

    def _loss(self, peft_model: Any, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, log-probability of every target token) for one step."""
        import torch

        from memedit.intrinsic.compute import forward_logits

        logits = forward_logits(self.model, batch.ids, batch.mask, batch.keep)
        token_lp = torch.log_softmax(logits.float(), dim=-1)[batch.tgt_index, batch.tgt_token]
        return -token_lp.mean(), token_lp

    def _after_step(self, peft_model: Any, step: int) -> None:
        """Called after every optimiser step (before the gradients are cleared)."""

    def _train(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hp: Any,
        modules: list[str],
    ) -> tuple[bytes, dict[str, torch.Tensor]]:
        import torch

        from memedit.intrinsic.compute import frozen, target_batch

        get_peft_model = _peft().get_peft_model
        device = next(self.model.parameters()).device
        batch = target_batch(tokenizer, [(r.prompt, r.target_new) for r in requests], device)
        what = repr(requests[0].prompt) + (
            f" and {len(requests) - 1} more" if len(requests) > 1 else ""
        )
        config = self._peft_config(hp, modules)
        floor = math.log(hp.stop_prob)
        with frozen(self.model), _quiet_peft():  # every requires_grad flag restored after
            peft_model = get_peft_model(self.model, config)
            try:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                opt = torch.optim.Adam(params, lr=hp.lr)
                for step in range(hp.steps + 1):
                    loss, token_lp = self._loss(peft_model, batch)
                    if not torch.isfinite(loss):
                        bad = float(loss.detach())
                        msg = f"{self.title} training of {what} diverged (loss {bad})"
                        raise NonFiniteAdapterError(msg)
                    if float(token_lp.detach().min()) >= floor or step == hp.steps:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    self._after_step(peft_model, step)
                log.debug("%s for %s: %d steps, loss %.4f", self.title, what, step, float(loss))
                deltas = _deltas_of(peft_model)
                blob = _zip_peft(peft_model, {"format": FORMAT, "method": self.method})
            finally:
                peft_model.unload()
        if self.deltas_from_payload:
            deltas = self._load_deltas(blob)
        return blob, deltas

    # ------------------------------------------------------------------ merging
    def commit(self, edit_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Merge prepared (or logged) LoRAs under their edit ids (all or none)."""
        if len(edit_ids) != len(payloads):
            msg = f"{len(edit_ids)} edit ids but {len(payloads)} payloads"
            raise InvalidRequestError(msg, field="payloads", value=len(payloads))
        merged = set(self.edit_ids())
        for edit_id in edit_ids:
            if edit_id in merged:
                msg = f"{self.title} edit {edit_id} is already merged"
                raise InvalidRequestError(msg, field="edit_id", value=edit_id)
        new: dict[int, dict[str, torch.Tensor]] = {}
        members: dict[int, list[int]] = {}
        first: int | None = None
        for edit_id, blob in zip(edit_ids, payloads, strict=True):
            if blob == MEMBER:  # a per-batch edit: it belongs to the last LoRA before it
                if first is None:
                    msg = f"{self.title} edit {edit_id} is a batch member without its batch's LoRA"
                    raise IntegrityError(msg)
                members.setdefault(first, []).append(edit_id)
                continue
            prepared = self._prepared.pop(blob, None)
            new[edit_id] = prepared if prepared is not None else self._load_deltas(blob)
            first = edit_id
        touched = {m for d in new.values() for m in d}
        self._check_untouched(touched)
        saved = {m: self._base[m] for m in touched if m in self._base}
        for module in touched:
            self._base.setdefault(module, self._weight(module).detach().clone())
        self._deltas.update(new)
        self._members.update(members)
        try:
            self._merge(touched)
        except BaseException:
            for edit_id in new:
                del self._deltas[edit_id]
                self._members.pop(edit_id, None)
            self._merge(touched)  # back to exactly the weights before
            for module in touched - set(saved):
                self._base.pop(module, None)
            raise

    def remove(self, edit_id: int) -> None:
        """Unmerge ``edit_id`` (with the rest of its batch, when trained per batch)."""
        first = self.group(edit_id)[0]
        deltas = self._deltas.get(first)
        if deltas is None:
            msg = f"{self.title} edit {edit_id} is not merged into this model"
            raise AdapterError(msg)
        self._check_untouched(set(deltas))
        del self._deltas[first]
        members = self._members.pop(first, [])
        try:
            self._merge(set(deltas))
        except BaseException:
            self._deltas[first] = deltas
            if members:
                self._members[first] = members
            raise

    def _check_untouched(self, modules: set[str]) -> None:
        import torch

        for module in modules:
            written = self._written.get(module)
            if written is not None and not torch.equal(self._weight(module), written):
                msg = (
                    f"{module} was changed since the last {self.title} merge (another edit "
                    "strategy wrote it); roll that edit back first"
                )
                raise AdapterError(msg)

    def _merge(self, modules: set[str]) -> None:
        """Write ``base + sum of active deltas`` into each module (the base itself when none)."""
        import torch

        plans: dict[str, torch.Tensor] = {}
        for module in sorted(modules):
            base = self._base[module]
            parts = [d[module] for _, d in sorted(self._deltas.items()) if module in d]
            if not parts:
                plans[module] = base
                continue
            total = base.to(torch.float32)
            for part in parts:
                total = total + part.to(device=total.device, dtype=torch.float32)
            if not bool(torch.isfinite(total).all()):
                msg = f"merging the {self.title} edits into {module} gives NaN/Inf weights; refused"
                raise NonFiniteAdapterError(msg)
            plans[module] = total.to(base.dtype)
        with torch.no_grad():
            for module, value in plans.items():
                self._weight(module).copy_(value)
                if value is self._base[module]:
                    del self._base[module]
                    self._written.pop(module, None)
                else:
                    self._written[module] = value.detach().clone()

    def _weight(self, module: str) -> torch.Tensor:
        import torch

        weight = self.model.get_submodule(module).weight
        if not isinstance(weight, torch.Tensor):
            msg = f"{module} has no weight tensor for a {self.title} merge"
            raise AdapterError(msg)
        return weight

    def _load_deltas(self, blob: bytes) -> dict[str, torch.Tensor]:
        """The deltas of a logged payload, computed by peft from the adapter it saved."""
        from memedit.intrinsic.compute import frozen

        peft = _peft()
        with tempfile.TemporaryDirectory() as tmp:
            _unzip(blob, Path(tmp), self.method, self.title)
            with frozen(self.model), _quiet_peft():
                peft_model = peft.PeftModel.from_pretrained(self.model, tmp)
                try:
                    return _deltas_of(peft_model)
                finally:
                    peft_model.unload()


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # an optional dependency: the `adapters` extra
        msg = "LoRA and AdaLoRA edits need peft: pip install 'memedit[adapters]'"
        raise AdapterError(msg) from exc
    return peft


def _deltas_of(peft_model: Any) -> dict[str, torch.Tensor]:
    """Module name (in the base model) -> peft's merged delta of its active adapter."""
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "get_delta_weight") and hasattr(layer, "base_layer"):
            for adapter in layer.active_adapters:
                delta = layer.get_delta_weight(adapter).detach().to("cpu").clone()
                out[name.removeprefix(prefix)] = delta
    if not out:
        msg = "peft injected no LoRA layer; check the target module"
        raise AdapterError(msg)
    return out


def _zip_peft(peft_model: Any, meta: dict[str, Any]) -> bytes:
    """peft's ``save_pretrained`` directory, zipped (with memedit's metadata beside it)."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file() and path.name != "README.md":
                    zf.write(path, path.relative_to(tmp).as_posix())
            zf.writestr(_META, json.dumps(meta))
    return buf.getvalue()


def _unzip(blob: bytes, dest: Path, method: str = "lora", title: str = "LoRA") -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            names = zf.namelist()
            if any(n.startswith("/") or ".." in Path(n).parts for n in names):
                msg = f"{title} payload holds a path outside its directory"
                raise IntegrityError(msg)
            zf.extractall(dest)
            meta: dict[str, Any] = json.loads(zf.read(_META))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        msg = f"not a serialised {title} edit: {exc}"
        raise IntegrityError(msg) from exc
    if meta.get("format") != FORMAT or meta.get("method") != method:
        msg = f"{title} payload metadata {meta!r} is not format {FORMAT} of {method!r}"
        raise IntegrityError(msg)
    return meta


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft warns about wrapping an already used model (the wrapper is undone right after),
    about a deprecated transformers call it makes, and, loading an AdaLoRA, that its
    rank_pattern names no module (AdaLoRA's pattern names the kept triplets, which peft
    applies after that check)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", "The following rank_pattern keys", RuntimeWarning)
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield


register_adapter("lora", LoraAdapter)
