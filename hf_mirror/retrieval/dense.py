"""Dense retrieval: a text's embedding is the mean of the model's last hidden states over its tokens; documents are
found by cosine similarity (the saved index's ``dense/`` vectors, the embedding baseline)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def batched(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def mean_pooled(model, texts: Sequence[Sequence[tuple[int, list[int], int]]], pad_id: int, batch_size: int = 16):
    """Mean last hidden state per text, given each text's windows ``(start, input_ids, n_context)`` (a float64 CPU
    tensor): each window pools the tokens it scores, so every token of a long text counts once."""
    import torch

    from hf_mirror.scan import collate

    device = next(model.parameters()).device
    flat = [(i, ids, ctx) for i, wins in enumerate(texts) for _, ids, ctx in wins]
    sums = torch.zeros(len(texts), model.config.hidden_size, dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    with torch.no_grad():
        for batch in batched(flat, batch_size):
            ids, mask = collate([w[1] for w in batch], pad_id, device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            hidden = hidden.double().cpu()
            for row, (i, seq, ctx) in enumerate(batch):
                sums[i] += hidden[row, ctx : len(seq)].sum(0)
                counts[i] += len(seq) - ctx
    return sums / counts.clamp(min=1).unsqueeze(1)


class Embedder:
    """Mean-pooled last hidden states of the model, per document (as the embedding baseline embeds them), in windows
    of ``max_length`` (default: the model's context)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None) -> None:
        from hf_mirror.cache import model_fingerprint
        from hf_mirror.modeling import context_length

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or context_length(model, tokenizer)
        self.overlap = max(1, self.max_length // 8)
        self.weights = model_fingerprint(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        from hf_mirror.corpus import document_tokens, windows

        per_text = [windows(document_tokens(self.tokenizer, t), self.max_length, self.overlap) for t in texts]
        return list(mean_pooled(self.model, per_text, self.pad_id, self.batch_size).numpy().astype(np.float32))


def top(scores: np.ndarray, positions: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``m`` of ``scores`` (ties: the lower position), best first."""
    if len(scores) > m > 0:
        keep = scores >= np.partition(scores, len(scores) - m)[len(scores) - m]  # every tie at the cut stays
        scores, positions = scores[keep], positions[keep]
    order = np.lexsort((positions, -scores))[:m]
    return scores[order], positions[order]


def nearest(vectors, ids: list, queries: np.ndarray, m: int, block: int = 1 << 16) -> list[list[tuple[object, float]]]:
    """The ``m`` documents nearest each query vector by cosine similarity, best first (ties: the earlier document).
    ``vectors`` (one row per id, e.g. memory-mapped) are read in blocks of ``block`` rows and only each query's best
    ``m`` are kept, so memory does not grow with the corpus."""
    q = np.asarray(queries, np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best = [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in q]
    for lo in range(0, len(ids), block):  # the vectors stay on disk
        rows = np.asarray(vectors[lo: lo + block], np.float32)
        sims = q @ (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).T
        where = np.arange(lo, lo + len(rows))
        best = [top(np.concatenate([s, row]), np.concatenate([i, where]), m)
                for (s, i), row in zip(best, sims, strict=True)]
    return [[(ids[i], float(s)) for s, i in zip(scores, idx, strict=True)] for scores, idx in best]
