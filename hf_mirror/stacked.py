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
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer


def lora_layers(peft_model: PeftModel, name: str) -> list[LoraLayer]:
    """The LoRA layers that hold adapter ``name`` (linear, embedding or other)."""
    return [m for m in peft_model.modules()
            if isinstance(m, LoraLayer) and any(name in getattr(m, attr) for attr in m.adapter_layer_names)]


class StackedLora:
    """The LoRA weights of adapters ``names`` stacked per layer (A: ``[G, r, in]``, B: ``[G, out, r]``).

    Inside :meth:`applied`, the PEFT adapters are switched off and every adapted layer adds, to the rows of group
    g, adapter g's update: a batch of ``G x k`` rows is read as G consecutive groups of k rows.
    """

    def __init__(self, peft_model: PeftModel, names: Sequence[str], trainable: bool = False) -> None:
        if not self.supports(peft_model, names[0]):
            raise ValueError("Stacked LoRA supports plain LoRA on linear layers only.")
        self.model = peft_model
        self.names = list(names)
        self.layers = lora_layers(peft_model, names[0])
        self.A = [self._stack(m.lora_A, trainable) for m in self.layers]
        self.B = [self._stack(m.lora_B, trainable) for m in self.layers]
        self.scaling = [m.scaling[names[0]] for m in self.layers]

    def _stack(self, modules, trainable: bool) -> torch.Tensor:
        return torch.stack([modules[n].weight.detach() for n in self.names]).requires_grad_(trainable)

    @staticmethod
    def supports(peft_model: PeftModel, name: str) -> bool:
        """Plain LoRA on linear layers (no DoRA or other variant, no LoRA bias): what the stacks implement."""
        layers = lora_layers(peft_model, name)
        return bool(layers) and all(isinstance(m, LoraLinear) and name not in m.lora_variant
                                    and not m.lora_bias.get(name, False) for m in layers)

    def parameters(self) -> list[torch.Tensor]:
        return self.A + self.B

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the base model plus each group's own LoRA update (the PEFT adapters themselves are off)."""
        g = len(self.names)

        def hook(a: torch.Tensor, b: torch.Tensor, scaling: float):
            def add(module, args, kwargs, out):
                x = args[0] if args else kwargs["x"]
                if x.shape[0] % g:
                    raise AssertionError(f"A batch for {g} stacked adapters needs a multiple of {g} rows, got "
                                       f"{x.shape[0]}.")
                rows = x.to(a.dtype).reshape(g, -1, x.shape[-1])  # [G, k x length, in]
                delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)) * scaling
                return out + delta.reshape(*out.shape).to(out.dtype)
            return add

        handles = [m.register_forward_hook(hook(a, b, s), with_kwargs=True)
                   for m, a, b, s in zip(self.layers, self.A, self.B, self.scaling, strict=True)]
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for h in handles:
                h.remove()

    def write_back(self) -> None:
        """Copy the (fitted) stacks into the PEFT adapters."""
        with torch.no_grad():
            for m, a, b in zip(self.layers, self.A, self.B, strict=True):
                for i, n in enumerate(self.names):
                    m.lora_A[n].weight.copy_(a[i])
                    m.lora_B[n].weight.copy_(b[i])
