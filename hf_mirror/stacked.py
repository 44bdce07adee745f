"""Stacked LoRA: several adapters in one batch, rows of group g through adapter g, with batched matmuls.

PEFT's mixed-adapter batches loop over the adapters inside every LoRA layer (an index copy in and out per adapter);
stacking the adapters' A and B matrices per layer computes every group's update with two ``torch.bmm`` calls. Used
to fit a group of mirrors in one pass (the stacks are the parameters the optimizer updates, then written back) and
to score a group of mirrors per forward pass of the scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer


class BatchRows:
    """A forward pre-hook on a model that records its batch's row count (``n``, from ``input_ids``): what an embedding
    table's hook needs to read positions shared by every row (GPT-2's ``[1, length]`` position ids) per row."""

    def __init__(self) -> None:
        self.n: int | None = None

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.n = ids.shape[0] if ids is not None else None


@contextmanager
def adapters_off(peft_model: PeftModel, layers: Sequence | None = None) -> Iterator[None]:
    """The base model inside: every adapter layer (``layers``, default all of the model's) switched off and back.

    What ``PeftModel.disable_adapter`` does for LoRA, without the walk over every parameter of every adapter it
    takes first to report the model's status (0.4 s per call with 40 mirrors on a 3-block model, once per batch)."""
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)] if layers is None else list(layers)
    if not all(hasattr(m, "_disable_adapters") for m in layers):
        with peft_model.disable_adapter():
            yield
        return
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before, strict=True):
            m._disable_adapters = flag


def lora_layers(peft_model: PeftModel, name: str) -> list[LoraLayer]:
    """The LoRA layers that hold adapter ``name`` (linear, embedding or other)."""
    return [m for m in peft_model.modules()
            if isinstance(m, LoraLayer) and any(name in getattr(m, attr) for attr in m.adapter_layer_names)]


def _plain_embedding(m, name: str) -> bool:
    """A LoRA embedding table without a variant or an embedding scale (what the stacks implement)."""
    return (isinstance(m, LoraEmbedding) and name not in m.lora_variant
            and getattr(m, "_get_embed_scale", lambda: None)() is None)


class StackedLora:
    """The LoRA weights of adapters ``names`` stacked per layer (A: ``[G, r, in]``, B: ``[G, out, r]``; for an
    embedding table A: ``[G, r, entries]``, B: ``[G, dim, r]``).

    Inside :meth:`applied`, the PEFT adapters are switched off and every adapted layer adds, to the rows of group
    g, adapter g's update: a batch of ``G x k`` rows is read as G consecutive groups of k rows.
    """

    def __init__(self, peft_model: PeftModel, names: Sequence[str], trainable: bool = False) -> None:
        if not self.supports(peft_model, names[0]):
            raise ValueError("Stacked LoRA supports plain LoRA on linear layers and embedding tables only.")
        self.model = peft_model
        self.names = list(names)
        self.layers = lora_layers(peft_model, names[0])
        # every adapter layer of the model, switched off while the stacks apply: found once, not per batch
        self.switched = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        self.A = [self._stack(self._weights(m, "A"), trainable) for m in self.layers]
        self.B = [self._stack(self._weights(m, "B"), trainable) for m in self.layers]
        self.scaling = [m.scaling[names[0]] for m in self.layers]

    def _weights(self, m, part: str) -> list[torch.Tensor]:
        if isinstance(m, LoraEmbedding):
            return [getattr(m, f"lora_embedding_{part}")[n] for n in self.names]
        return [getattr(m, f"lora_{part}")[n].weight for n in self.names]

    @staticmethod
    def _stack(weights: list[torch.Tensor], trainable: bool) -> torch.Tensor:
        return torch.stack([w.detach() for w in weights]).requires_grad_(trainable)

    @staticmethod
    def supports(peft_model: PeftModel, name: str) -> bool:
        """Plain LoRA on linear layers and embedding tables (no DoRA or other variant, no LoRA bias): what the
        stacks implement."""
        layers = lora_layers(peft_model, name)
        return bool(layers) and all(
            isinstance(m, LoraLinear) and name not in m.lora_variant and not m.lora_bias.get(name, False)
            or _plain_embedding(m, name) for m in layers)

    def parameters(self) -> list[torch.Tensor]:
        return self.A + self.B

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the base model plus each group's own LoRA update (the PEFT adapters themselves are off)."""
        g = len(self.names)
        rows = BatchRows()

        def lookup(a: torch.Tensor, b: torch.Tensor, scaling: float):
            def add(module, args, kwargs, out):
                ids = args[0] if args else kwargs["input"]
                if ids.shape[0] == 1 and (rows.n or 1) > 1:  # positions shared by every row
                    ids = ids.expand(rows.n, *ids.shape[1:])
                if ids.shape[0] % g:
                    raise AssertionError(f"A batch for {g} stacked adapters needs a multiple of {g} rows, got "
                                         f"{ids.shape[0]}.")
                picked = a.transpose(1, 2)[torch.arange(g, device=ids.device)[:, None], ids.reshape(g, -1)]
                delta = torch.bmm(picked, b.transpose(1, 2)) * scaling  # [G, k x length, dim]
                return out + delta.reshape(*ids.shape, -1).to(out.dtype)
            return add

        def hook(a: torch.Tensor, b: torch.Tensor, scaling: float):
            def add(module, args, kwargs, out):
                x = args[0] if args else kwargs["x"]
                if x.shape[0] % g:
                    raise AssertionError(f"A batch for {g} stacked adapters needs a multiple of {g} rows, got "
                                       f"{x.shape[0]}.")
                rows = x.to(a.dtype).reshape(g, -1, x.shape[-1])  # [G, k x length, in]
                low = torch.bmm(rows, a.transpose(1, 2))  # [G, k x length, r]
                if not torch.is_grad_enabled() and out.dtype == low.dtype and out.is_contiguous():
                    # scoring: accumulate into the layer's output in place (no [rows, length, out] copy: for the
                    # output layer that is a vocabulary-wide tensor)
                    out.view(g, -1, out.shape[-1]).baddbmm_(low, b.transpose(1, 2), alpha=scaling)
                    return out
                delta = torch.bmm(low, b.transpose(1, 2)) * scaling
                return out + delta.reshape(*out.shape).to(out.dtype)
            return add

        handles = [self.model.register_forward_pre_hook(rows, with_kwargs=True)]
        handles += [m.register_forward_hook((lookup if isinstance(m, LoraEmbedding) else hook)(a, b, s),
                                            with_kwargs=True)
                    for m, a, b, s in zip(self.layers, self.A, self.B, self.scaling, strict=True)]
        try:
            with adapters_off(self.model, self.switched):
                yield
        finally:
            for h in handles:
                h.remove()

    def write_back(self) -> None:
        """Copy the (fitted) stacks into the PEFT adapters."""
        with torch.no_grad():
            for m, a, b in zip(self.layers, self.A, self.B, strict=True):
                for i, (wa, wb) in enumerate(zip(self._weights(m, "A"), self._weights(m, "B"), strict=True)):
                    wa.copy_(a[i])
                    wb.copy_(b[i])
