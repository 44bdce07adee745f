"""Shared trunk: when mirrors adapt only the top blocks, run the blocks below them once per batch.

Every mirror sees the same hidden states at the input of the lowest adapted block, so the trunk under it is
computed once (during the base pass, or by a trunk-only pass when base losses come from the cache) and each
mirror runs only the adapted blocks and the LM head. The result is the same as a full forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _Skip(nn.Module):
    """Stands in for a trunk block during mirror passes: passes its input through untouched."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _TrunkDone(Exception):
    """Raised at the first adapted block to stop a trunk-only pass."""


def find_blocks(model) -> nn.ModuleList:
    """The model's list of transformer blocks (``transformer.h``, ``model.layers``, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("h", "layers", "blocks"):
            return module
    raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__} for a shared trunk.")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class SharedTrunk:
    """Caches the input of block ``first`` (the lowest adapted block) and feeds it to the mirror passes."""

    def __init__(self, model, first: int) -> None:
        self.blocks = find_blocks(model)
        if not 0 < first < len(self.blocks):
            last = len(self.blocks) - 1
            raise ValueError(f"A shared trunk needs the lowest adapted block in 1..{last}, not {first}.")
        self.first = first
        self.hidden: torch.Tensor | None = None

    @contextmanager
    def capture(self, stop: bool = False) -> Iterator[None]:
        """Record block ``first``'s input during a forward pass; ``stop`` ends the pass right there."""

        def hook(module, args, kwargs):
            self.hidden = _hidden(args, kwargs).detach()
            if stop:
                raise _TrunkDone

        handle = self.blocks[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        except _TrunkDone:
            pass
        finally:
            handle.remove()

    @contextmanager
    def reuse(self, repeat: int = 1) -> Iterator[None]:
        """Skip the trunk blocks and start block ``first`` from the recorded hidden states.

        ``repeat`` > 1 for a batch that stacks the recorded batch that many times (mixed-adapter batches).
        """
        if self.hidden is None:
            raise AssertionError("No trunk recorded for this batch.")  # a bug in hf_mirror, not bad input
        hidden = self.hidden if repeat == 1 else self.hidden.repeat(repeat, *([1] * (self.hidden.dim() - 1)))
        saved = [self.blocks[i] for i in range(self.first)]
        skip = _Skip()
        for i in range(self.first):
            self.blocks[i] = skip

        def hook(module, args, kwargs):
            return _with_hidden(args, kwargs, hidden)

        handle = self.blocks[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(saved):
                self.blocks[i] = block
