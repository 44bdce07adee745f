"""Gradient-similarity baseline (TracIn at one checkpoint) on the parameters of one LoRA adapter.

Choice of parameters: one PEFT LoRA adapter is attached with the standard initialisation (A random from a
fixed seed, B = 0), so the model computes exactly the trained function. At B = 0 the gradient w.r.t. A is
zero and the gradient w.r.t. B is ``scale * dL/dW @ A.T``: a seeded random projection of each adapted weight
matrix's full gradient onto ``rank`` directions (as in LoGra/TRAK-style projected gradients). Gradients of
both A and B are collected (A's part is zero and does not change cosine or dot products).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model

from hf_mirror.baselines._common import Document
from hf_mirror.baselines.scorer import Scorer
from hf_mirror.errors import InputError
from hf_mirror.mirror import MirrorConfig, lora_config, quiet_peft
from hf_mirror.probes import Probe, encode_probe
from hf_mirror.scan import collate

SIMILARITIES = ("cosine", "dot")


class GradSimBaseline(Scorer):
    """Score = similarity of the probe's completion-loss gradient and the document's mean-token-loss gradient.

    ``similarity`` is ``"cosine"`` (default) or ``"dot"`` (TracIn's raw inner product, which favours
    documents with large gradients). ``rank``, ``alpha``, ``target_modules``, ``layers`` and ``seed`` shape
    the adapter (PEFT defaults for the architecture unless given); ``include_prompt`` adds prompt tokens to
    the probe loss. Call :meth:`close` to remove the adapter from the model.
    """

    name = "gradsim"
    needs_model = True
    needs_grad = True

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 similarity: str = "cosine", rank: int = 8, alpha: float = 16.0,
                 target_modules: str | list[str] | None = "all-linear", layers: list[int] | None = None, seed: int = 0,
                 include_prompt: bool = False) -> None:
        if similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        self.similarity = similarity
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lora = MirrorConfig(rank=rank, alpha=alpha, target_modules=target_modules, layers=layers, seed=seed)
        batches = [encode_probe(tokenizer, p, include_prompt, max_length) for p in probes]  # fail before attaching
        torch.manual_seed(seed)
        self._base = model
        self._trainable = {n: p.requires_grad for n, p in model.named_parameters()}  # PEFT freezes them
        with quiet_peft():
            self.model = get_peft_model(model, lora_config(lora, model))
        self.model.eval()
        self.device = next(model.parameters()).device
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        grads = [self._flat_grad(self.model(input_ids=b["input_ids"].to(self.device),
                                            labels=b["labels"].to(self.device)).loss) for b in batches]
        self.probe_grads = torch.stack(grads)  # [probes, parameters]
        if similarity == "cosine":
            self.probe_grads = _unit(self.probe_grads)

    def _flat_grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                          for g, p in zip(grads, self.params, strict=True)])

    def document_grad(self, doc: Document, windows_per_batch: int = 8) -> torch.Tensor:
        """Gradient of the document's mean token loss, accumulated over batches of its windows."""
        n_tokens = sum(len(seq) - ctx for _, seq, ctx in doc.windows)
        total: torch.Tensor | None = None
        for lo in range(0, len(doc.windows), windows_per_batch):
            chunk = doc.windows[lo : lo + windows_per_batch]
            ids, mask = collate([w[1] for w in chunk], self.pad_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=self.device)
            for r, (_, seq, ctx) in enumerate(chunk):
                scored[r, ctx - 1 : len(seq) - 1] = 1.0  # the window scores seq[ctx:], predicted from ctx-1 on
            g = self._flat_grad((losses.view_as(scored) * scored).sum() / n_tokens)
            total = g if total is None else total + g
        assert total is not None
        return total

    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """Each document with its gradient similarity to every probe."""
        for doc in documents:
            g = self.document_grad(doc)
            if self.similarity == "cosine":
                g = _unit(g)
            yield doc, (self.probe_grads @ g).numpy()

    def close(self) -> None:
        """Remove the adapter: the caller gets back their model unchanged (trainable as it was)."""
        self.model.unload()
        for n, p in self._base.named_parameters():
            p.requires_grad_(self._trainable.get(n, p.requires_grad))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
