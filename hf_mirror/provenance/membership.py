"""Membership inference: was a text in the model's training data? Min-K% Prob and Min-K%++.

Min-K% Prob (Shi et al., 2023, arXiv 2310.16789): a text seen in training has few tokens the model finds very
surprising, so the mean log-probability of its ``k`` % least likely tokens is higher (less negative) than for
unseen text of similar style. Min-K%++ (Zhang et al., 2024, arXiv 2404.02936) first standardises each token's
log-probability against the model's own next-token distribution at that position,
``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t``, ``sigma_t`` the mean and standard deviation of ``log p(z)`` for
``z ~ p``: training pushes a seen token towards a local maximum of the likelihood, which this measures directly
instead of comparing raw probabilities across positions of different difficulty.
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


def _losses_and_stats(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per next-token position: ``[3, B, L-1]`` = loss, mean and std of the log-probs under the model."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mu = (logp.exp() * logp).sum(-1)
    var = (logp.exp() * logp.square()).sum(-1) - mu.square()
    return torch.stack([loss, mu, var.clamp_min(1e-12).sqrt()])


@torch.no_grad()
def token_logprobs(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None, overlap: int = 64,
    with_stats: bool = False,
) -> list[np.ndarray]:
    """Log-probability of every token of each text given the start token (``start_token_id``) and the text before it.

    Texts longer than the context are split into windows that repeat ``overlap`` tokens as context (never
    truncated), so every token is scored exactly once. An empty text gives an empty array. ``with_stats``: each
    array is ``[3, n]`` instead, rows log-prob, ``mu`` and ``sigma`` of the model's log-probs at that position.
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
        out.append(np.zeros((3, len(seq) - 1) if with_stats else len(seq) - 1, dtype=np.float32))
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
            if with_stats:
                stats = _losses_and_stats(model, ids.to(device), mask.to(device)).cpu().numpy()
                stats[0] *= -1
            else:
                stats = -token_losses(model, ids.to(device), mask.to(device)).cpu().numpy()[None]
            for r, (i, start, w, ctx) in enumerate(batch):
                scored = stats[:, r, ctx - 1 : len(w) - 1]
                out[i][..., start : start + scored.shape[1]] = scored if with_stats else scored[0]
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


def min_k_plus_plus(stats: np.ndarray, k: float = 20.0) -> float:
    """Min-K%++ of one text from its ``[3, n]`` token statistics (``token_logprobs(..., with_stats=True)``): the
    mean of the lowest ``k`` % standardised log-probs ``(log p - mu) / sigma``; NaN for an empty text."""
    stats = np.asarray(stats, dtype=np.float64)
    return min_k_percent((stats[0] - stats[1]) / stats[2], k) if stats.shape[-1] else float("nan")


MEMBERSHIP_METHODS = ("mink++", "mink")


def min_k_scores(
    model, tokenizer, texts: Sequence[str], k: float = 20.0, batch_size: int = 8, max_length: int | None = None,
    method: str = "mink",
) -> np.ndarray:
    """Membership score of each text, higher = more likely seen in training: Min-K% Prob (``method="mink"``)
    or Min-K%++ (``"mink++"``)."""
    if not 0 < k <= 100:
        raise InputError(f"k is a percentage in (0, 100], got {k}.")
    if method not in MEMBERSHIP_METHODS:
        raise InputError(f"Unknown membership method {method!r}; choose among {list(MEMBERSHIP_METHODS)}.")
    plus = method == "mink++"
    lps = token_logprobs(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, with_stats=plus)
    score = min_k_plus_plus if plus else min_k_percent
    return np.array([score(lp, k) for lp in lps], dtype=np.float64)
