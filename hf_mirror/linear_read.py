"""The mirrors' first-order read: every mirror's loss change on a batch of windows from one forward and one backward.

A mirror adds ``scaling * B A`` to each adapted weight. To first order, the change of a window's scored loss is the
inner product of that update with the window's gradient, and for a layer with inputs ``x_t`` and output gradients
``d_t`` (one per position t) that is ``scaling * sum_t (B^T d_t) . (A x_t)``: two thin matmuls against all mirrors'
stacked factors, a fraction ``r (in + out) / (in x out)`` of the layer's forward cost per mirror. An embedding table
reads ``A``'s column of each position's id instead of ``A x_t``. So the base model runs once forward and once backward
per batch, shared by every mirror, and a mirror costs its contractions alone; the forward read runs a forward pass
per mirror. The gradient mirror's step is sized to a 0.01-nat first-order rise, where the two reads agree
(``tests/test_linear_read.py``); mirrors fitted by optimizer steps are read by forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import Embedding as LoraEmbedding

from hf_mirror.curvature import capture
from hf_mirror.stacked import StackedLora, adapters_off


class LinearRead:
    """The first-order loss change of each of the mirrors ``names`` (adapters of ``peft_model``) on window batches."""

    def __init__(self, peft_model, names: Sequence[str]) -> None:
        stack = StackedLora(peft_model, names)  # A: [G, r, in or entries], B: [G, out, r]
        self.model = peft_model
        self.names = list(names)
        self.n = len(names)
        # captured at the wrapped layers (an embedding table's hook knows its own kind)
        self.layers = {str(i): m.get_base_layer() for i, m in enumerate(stack.layers)}
        self.switched = stack.switched  # the model's adapter layers, switched off for the base pass
        self.tables = [isinstance(m, LoraEmbedding) for m in stack.layers]
        # every mirror's factors side by side: A as [G x r, in], B (times its scaling) as [out, G x r]
        self.A = [a.reshape(-1, a.shape[-1]) for a in stack.A]
        self.B = [(b * s).permute(1, 0, 2).reshape(b.shape[1], -1) for b, s in zip(stack.B, stack.scaling,
                                                                                  strict=True)]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's token losses ``[B, L-1]`` and, per row and mirror, the first-order change of the sum of the
        row's ``scored`` token losses (``scored``: a ``[B, L-1]`` mask over the loss positions) ``[B, G]``."""
        with adapters_off(self.model, self.switched), capture(self.model, self.layers) as seen:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = input_ids[:, 1:]
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            (losses * scored).sum().backward()
        rows = input_ids.shape[0]
        out = torch.zeros(rows, self.n, dtype=torch.float32, device=input_ids.device)
        for key, table, a, b in zip(self.layers, self.tables, self.A, self.B, strict=True):
            got = seen[key]
            if "d" not in got:  # the layer does not reach a scored loss (a table no row reads)
                continue
            d = got["d"].reshape(rows, -1, got["d"].shape[-1])
            if table:
                low = a.t()[got["x"].reshape(rows, -1)]  # [B, L, G x r]: A's column of each position's id
            else:
                low = got["x"].reshape(rows, -1, got["x"].shape[-1]).to(a.dtype) @ a.t()
            high = d.to(b.dtype) @ b  # [B, L, G x r]
            out += (low * high).reshape(rows, -1, self.n, a.shape[0] // self.n).sum(dim=(1, 3)).float()
        return losses.detach(), out
