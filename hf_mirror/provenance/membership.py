"""Membership inference: was a text in the model's training data? Min-K% Prob (Shi et al., 2023).

A text seen in training has few tokens the model finds very surprising, so the mean log-probability of its
``k`` % least likely tokens is higher (less negative) than for unseen text of similar style.
Reference: Shi et al., "Detecting Pretraining Data from Large Language Models", arXiv 2310.16789.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hf_mirror.corpus import document_tokens, windows
from hf_mirror.errors import InputError
from hf_mirror.modeling import context_length
from hf_mirror.probes import start_token_id
from hf_mirror.scan import token_losses


@torch.no_grad()
def token_logprobs(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None, overlap: int = 64
) -> list[np.ndarray]:
    """Log-probability of every token of each text given the start token (``start_token_id``) and the text before it.

    Texts longer than the context are split into windows that repeat ``overlap`` tokens as context (never
    truncated), so every token is scored exactly once. An empty text gives an empty array.
    """
    if isinstance(texts, str):
        texts = [texts]
    max_length = max_length or context_length(model, tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token_id(tokenizer)
    jobs = []  # (text index, first token scored, window ids, n_context)
    out: list[np.ndarray] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"Text {i} is a {type(text).__name__}, not a string.")
        seq = document_tokens(tokenizer, text)
        out.append(np.zeros(len(seq) - 1, dtype=np.float32))
        jobs.extend((i, start, ids, ctx) for start, ids, ctx in windows(seq, max_length, overlap))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b : b + batch_size]
            width = max(len(j[2]) for j in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, _, w, _) in enumerate(batch):  # right padding keeps real tokens' logits unchanged
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            losses = token_losses(model, ids.to(device), mask.to(device)).cpu().numpy()
            for r, (i, start, w, ctx) in enumerate(batch):
                scored = losses[r, ctx - 1 : len(w) - 1]
                out[i][start : start + len(scored)] = -scored
    finally:
        model.train(was_training)
    return out


def min_k_percent(logprobs: np.ndarray, k: float = 20.0) -> float:
    """Mean of the lowest ``k`` % of token log-probs (at least one token); NaN for an empty text."""
    if not 0 < k <= 100:
        raise InputError(f"k is a percentage in (0, 100], got {k}.")
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        return float("nan")
    count = max(1, int(logprobs.size * k / 100))
    return float(np.sort(logprobs)[:count].mean())


def min_k_scores(
    model, tokenizer, texts: Sequence[str], k: float = 20.0, batch_size: int = 8, max_length: int | None = None
) -> np.ndarray:
    """Min-K% Prob membership score of each text: higher (less negative) = more likely seen in training."""
    if not 0 < k <= 100:
        raise InputError(f"k is a percentage in (0, 100], got {k}.")
    lps = token_logprobs(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return np.array([min_k_percent(lp, k) for lp in lps], dtype=np.float64)
