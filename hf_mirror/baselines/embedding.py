"""Embedding baseline: cosine similarity of mean-pooled last hidden states of probe text and document."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from hf_mirror.baselines._common import Document
from hf_mirror.baselines.scorer import Scorer
from hf_mirror.corpus import document_tokens, windows
from hf_mirror.probes import Probe
from hf_mirror.retrieval.dense import batched, mean_pooled


class EmbeddingBaseline(Scorer):
    """A text's embedding is the mean of the model's last hidden states over its tokens (no gradients).

    Probes are embedded from prompt + completion. Documents longer than the context are split into the same
    windows as the scan; each window contributes the hidden states of the tokens it scores, so every token
    counts once. The start token is not pooled (it is the same in every text).
    """

    name = "embedding"
    needs_model = True

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 batch_size: int = 16) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.overlap, self.batch_size = max_length, overlap, batch_size
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        probe_windows = [windows(document_tokens(tokenizer, p.text), max_length, overlap) for p in probes]
        self.probe_vectors = _unit(self._embed(probe_windows))  # [probes, hidden]

    def _embed(self, texts: Sequence[Sequence[tuple[int, list[int], int]]]) -> torch.Tensor:
        return mean_pooled(self.model, texts, self.pad_id, self.batch_size)

    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """Each document with its cosine similarity to every probe."""
        for batch in batched(documents, self.batch_size):
            vectors = _unit(self._embed([d.windows for d in batch]))
            yield from zip(batch, (vectors @ self.probe_vectors.T).numpy(), strict=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
