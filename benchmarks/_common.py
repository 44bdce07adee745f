"""Pieces shared by the benchmarks and the bundled metric modules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

RANKING_FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                      "references": datasets.Sequence(datasets.Value("string"))})


def metric_info(description: str, kwargs: str, features: datasets.Features):
    """The ``evaluate.MetricInfo`` of a bundled metric module (its ``_info``)."""
    import evaluate

    return evaluate.MetricInfo(description=description, citation="", inputs_description=kwargs, features=features)


def score_features(reference_type: str) -> datasets.Features:
    """A float score per example against a reference of ``reference_type`` (e.g. "int32" labels)."""
    return datasets.Features({"predictions": datasets.Value("float64"),
                              "references": datasets.Value(reference_type)})


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2 + 1
    return ranks


def top_k_share(scores: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean true effect of the ``k`` documents a method ranks highest (``scores`` descending, ties in document
    order, NaN scores last) over the mean of the ``k`` largest true effects: 1 = the best possible top k, about
    mean(truth) / best for a random order; NaN when the best top k does not raise the probe (its mean <= 0)."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError("scores and truth must be 1-D and of the same length.")
    if k < 1:
        raise ValueError("k must be at least 1.")
    k = min(k, len(truth))
    chosen = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]
    best = np.sort(truth)[::-1][:k].mean() if k else float("nan")
    return float(truth[chosen].mean() / best) if k and best > 0 else float("nan")


def forward_pass_seconds(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 8,
                         by_length: bool = False) -> float:
    """Wall time of one forward pass of ``model`` over every document (windows cut as the scan cuts them), in
    batches of ``batch_size``; ``by_length`` batches the windows in order of length, as the scan pools them."""
    import time

    import torch

    from hf_mirror.corpus import document_tokens, windows
    from hf_mirror.scan import collate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    start = time.perf_counter()
    seqs = [ids for t in texts for _, ids, _ in windows(document_tokens(tokenizer, t), max_length,
                                                         max(1, max_length // 8))]
    if by_length:
        seqs.sort(key=len)
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask = collate(seqs[i: i + batch_size], pad, device)
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def cache_key(payload: object) -> str:
    """A short stable hash of a JSON-able ``payload`` (what a cached benchmark artefact was made from)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj: object) -> None:
    """``obj`` as JSON at ``path``, written atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
