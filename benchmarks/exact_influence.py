"""Exact first-order influence by parameter group: which weights a mirror must perturb, and how to scale them.

For every probe p and document d, the exact gradient inner product ``<g_p, P g_d>`` restricted to a group of the
model's parameters (autograd on the full model, every document's gradient kept: small models only), with ``P`` the
identity (``plain``: what one SGD step on d does to p, to first order) or the inverse root mean square of the
documents' gradients (``rms``: Adam's normaliser, ``hf_mirror.curvature`` kind ``rms``). Each matrix is scored like a
method against the tail-patch ground truth and the LDS retrains. It answers what a perturbation of those weights can
reach at its first-order limit, before any LoRA rank or finite step: e.g. on capitals the blocks' linear layers alone
read the SGD tail patch at Spearman 0.10 (held-out) while every parameter reads it at 0.999, and no first-order
estimate reaches EK-FAC's LDS there (docs/benchmarks_tail_patch.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from benchmarks.lds import Retrains, Setup, lds_of_matrix
from benchmarks.tail_patch import evaluate_matrix

__all__ = ["GROUPS", "document_gradients", "group_matrix", "run_exact_influence"]


def _in_blocks(name: str) -> bool:
    return ".h." in name or ".layers." in name


def _block_linear(name: str) -> bool:
    return _in_blocks(name) and name.endswith("weight") and not any(k in name for k in ("ln_", "norm"))


GROUPS: dict[str, Callable[[str], bool]] = {  # parameter name -> in the group (GPT-2 and Llama names)
    "blocks-linear": _block_linear,  # the default mirror's layers before 2026-12-07 (``all-linear``)
    "blocks-linear+embeddings": lambda n: _block_linear(n) or "wte" in n or "wpe" in n or "embed_tokens" in n
    or "lm_head" in n,  # + the token and position tables (a tied table's gradient also holds the output layer's)
    "blocks-norms-biases": lambda n: _in_blocks(n) and not _block_linear(n),
    "all": lambda n: True,
}


def document_gradients(setup: Setup) -> tuple[list[str], list[list], list[list]]:
    """The parameter names, each probe's gradient of its mean completion log-probability and each document's
    gradient of its mean token loss (windowed as the scan windows it), one tensor per parameter, float32."""
    import torch

    from benchmarks.tail_patch import _document_batch, _probe_batch, _token_logprobs
    from hf_mirror.modeling import window_length

    model, tok = setup.model, setup.tokenizer
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        def grads(loss):
            out = torch.autograd.grad(loss, params, allow_unused=True)
            return [g if g is not None else torch.zeros_like(p) for g, p in zip(out, params, strict=True)]

        ids, mask, labels = _probe_batch(tok, setup.probes)
        probes = []
        for i in range(len(setup.probes)):
            logp, keep = _token_logprobs(model, ids[i : i + 1], mask[i : i + 1], labels[i : i + 1])
            probes.append(grads(logp.sum() / keep.sum()))
        length = window_length(model, tok, None)
        documents = []
        for doc in setup.documents:
            logp, keep = _token_logprobs(model, *_document_batch(tok, doc["text"], length, max(1, length // 8)))
            documents.append(grads(-logp.sum() / keep.sum()))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return names, probes, documents


def group_matrix(names: Sequence[str], probes: list[list], documents: list[list], group: Callable[[str], bool],
                 precondition: str = "plain", damping: float = 0.1) -> np.ndarray:
    """``<g_p, P g_d>`` over the parameters in ``group`` [probes, documents]: > 0 when a step on d raises p.
    ``precondition``: ``plain`` or ``rms`` (divide by the documents' gradient RMS + ``damping`` x its mean)."""
    import torch

    index = [k for k, n in enumerate(names) if group(n)]
    p = torch.stack([torch.cat([g[k].flatten() for k in index]) for g in probes]).double()
    d = torch.stack([torch.cat([g[k].flatten() for k in index]) for g in documents]).double()
    if precondition == "rms":
        rms = (d ** 2).mean(0).sqrt()
        d = d / (rms + damping * rms.mean())
    elif precondition != "plain":
        raise ValueError(f"precondition must be 'plain' or 'rms', got {precondition!r}.")
    return -(p @ d.T).numpy()  # p holds log-probability gradients, d loss gradients: a loss step -g_d raises p


def run_exact_influence(setup: Setup, truths: dict[str, np.ndarray], retrains: Retrains | None,
                        groups: Sequence[str] = tuple(GROUPS), preconditions: Sequence[str] = ("plain", "rms"),
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Every group x preconditioner scored against the tail-patch ground truths (``truths``: variant -> [probes,
    documents]) and, with ``retrains``, LDS; tune and held-out halves. A JSON-able report."""
    names, probes, documents = document_gradients(setup)
    rows = {}
    for name in groups:
        for kind in preconditions:
            matrix = group_matrix(names, probes, documents, GROUPS[name], kind)
            row = {v: evaluate_matrix(matrix, truth) for v, truth in truths.items()}
            out = {v: {h: {"top_k_share": r[h]["top_k_share"], "spearman": r[h]["spearman"]}
                       for h in ("tune", "held_out")} for v, r in row.items()}
            if retrains is not None:
                per = lds_of_matrix(matrix, retrains)["per_probe"]
                values = np.array([per[p] for p in retrains.probe_ids], np.float64)
                out["lds"] = {"tune": float(np.nanmean(values[0::2])), "held_out": float(np.nanmean(values[1::2]))}
            rows[f"{name} ({kind})"] = out
            log(f"{name} ({kind}) done")
    return {"documents": len(setup.documents), "probes": len(setup.probes), "rows": rows}


def format_table(report: dict) -> str:
    """Held-out and tune halves per row: tail-patch SGD and Adam (top-10 share / Spearman) and LDS."""
    lines = ["| parameters (preconditioner) | half | SGD share / Spearman | Adam share / Spearman | LDS |",
             "| --- | --- | --- | --- | --- |"]
    for label, row in report["rows"].items():
        for half in ("held_out", "tune"):
            cells = [f"{row[v][half]['top_k_share']:.3f} / {row[v][half]['spearman']:.3f}" for v in ("sgd", "adam")]
            lds = f"{row['lds'][half]:.3f}" if "lds" in row else ""
            lines.append(f"| {label} | {half.replace('_', '-')} | {cells[0]} | {cells[1]} | {lds} |")
    return "\n".join(lines)
