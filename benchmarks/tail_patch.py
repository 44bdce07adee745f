"""Tail-patch benchmark: a method's top documents against the exact effect of training on each document.

Ground truth (:func:`tail_patch_matrix`). From the trained model, for every document: a fresh optimizer takes
``steps`` steps on that document's LM loss (mean token cross-entropy over its tokens, windowed like the scan:
:func:`hf_mirror.corpus.document_tokens` and :func:`hf_mirror.corpus.windows`), then every probe's mean
completion-token log-probability (prompt excluded, as :func:`hf_mirror.probes.encode_probe`) is measured, minus its
value under the original model; the weights are restored exactly before the next document. Entry [p, d] > 0:
training on d raised probe p's log-probability (d supports p). Exact, not estimated: one short training run per
document, with all probes evaluated in one padded batch.

Two variants (:data:`VARIANTS`):

- ``sgd``: 1 SGD step at :data:`SGD_LR` = 1e-2, the linear regime, where the effect is first order,
  lr x g_probe . g_doc (what gradient-based influence estimates). Checked with :func:`linearity` on the full
  models: the matrices at lr and lr/2 correlate at r = 0.996 (wordnet) and 0.9997 (capitals), norm ratios 2.03
  and 2.0004 (2 = linear); at 3e-2 r drops to 0.970 on wordnet (docs/benchmarks_tail_patch.md).
- ``adam``: 3 Adam steps at :data:`ADAM_LR` = 3e-4, a tenth of the models' peak training lr (``LDSConfig.lr`` =
  3e-3). A fresh Adam's first steps move every weight by about lr whatever the size of its gradient, a far larger
  move than the end of training's (its one-cycle schedule anneals to ~0): at 3e-3 no document raises any wordnet
  probe (0.1 % of the entries are positive; the top-10 share is undefined for all 40 probes), at 1e-3 12 of the
  40 still have none. At 3e-4 every probe of both corpora has documents that raise it, and the effect is far from
  linear (Pearson r with the SGD matrix 0.47 on wordnet, 0.57 on capitals).

The metric (bundled ``tail_patch`` evaluate module, :func:`benchmarks._common.top_k_share`): per probe, the mean
true effect of a method's top 10 documents over that of the best possible top 10, and the Spearman correlation
over all documents; averaged over all probes, the tune half (even positions) and the held-out half (odd).
The ground truth is cached on disk (:func:`ground_truth`), so re-scoring a method takes seconds.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks._common import cache_key, top_k_share
from benchmarks.lds import LDSConfig, Setup, cache_root, full_setup, method_scores, parse_method, score_matrix
from hf_mirror.errors import InputError

__all__ = ["ADAM_LR", "ADAM_STEPS", "K", "SGD_LR", "SGD_STEPS", "VARIANTS", "evaluate_matrix", "format_table",
           "ground_truth", "linearity", "proponent_ranks", "proponent_summary", "run_tail_patch", "source_mrr",
           "tail_patch_matrix",
           "top_k_share"]

SGD_LR = 1e-2  # one step stays linear: lr vs lr/2 correlate at r >= 0.996 on the full wordnet and capitals models
SGD_STEPS = 1
ADAM_LR = 3e-4  # a tenth of the training peak lr (at 3e-3 every document lowers every wordnet probe)
ADAM_STEPS = 3
VARIANTS: dict[str, dict] = {"sgd": {"optimizer": "sgd", "steps": SGD_STEPS, "lr": SGD_LR},
                             "adam": {"optimizer": "adam", "steps": ADAM_STEPS, "lr": ADAM_LR}}
K = 10  # the top-k share's cut-off
PROTOCOL = 1  # bump when the ground truth's computation changes (part of its cache key)


# --- the ground truth -----------------------------------------------------------------------------------------

def _document_batch(tokenizer, text: str, max_length: int, overlap: int):
    """The document's windows as one right-padded batch: input ids, attention mask and labels (-100 on each
    window's context and padding), so that the mean over labelled tokens is the document's mean token loss."""
    import torch

    from hf_mirror.corpus import document_tokens, windows

    parts = windows(document_tokens(tokenizer, text), max_length, overlap)
    if not parts:
        raise InputError(f"Document {text[:40]!r} has no tokens.")
    width = max(len(ids) for _, ids, _ in parts)
    ids = torch.zeros((len(parts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (_, window, ctx) in enumerate(parts):
        ids[r, : len(window)] = torch.tensor(window)
        mask[r, : len(window)] = 1
        labels[r, ctx : len(window)] = torch.tensor(window[ctx:])
    return ids, mask, labels


def _probe_batch(tokenizer, probes: Sequence[dict]):
    """Every probe (:func:`hf_mirror.probes.encode_probe`) in one right-padded batch: ids, mask, labels."""
    import torch

    from hf_mirror.probes import Probe, encode_probe

    encoded = [encode_probe(tokenizer, Probe(p["id"], p["prompt"], p["completion"])) for p in probes]
    width = max(e["input_ids"].shape[1] for e in encoded)
    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        ids[r, :n], mask[r, :n], labels[r, :n] = e["input_ids"][0], 1, e["labels"][0]
    return ids, mask, labels


def _token_logprobs(model, ids, mask, labels):
    """Log-probability of each labelled token [rows, width - 1] (0 elsewhere) and the labelled-token mask."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * keep, keep


def _probe_logprobs(model, batch) -> np.ndarray:
    """Each probe's mean completion-token log-probability under ``model``."""
    import torch

    with torch.no_grad():
        logp, keep = _token_logprobs(model, *batch)
        return (logp.sum(1) / keep.sum(1)).double().numpy()


def tail_patch_matrix(model, tokenizer, documents: Sequence[dict], probes: Sequence[dict], *, optimizer: str,
                      steps: int, lr: float, max_length: int | None = None,
                      log: Callable[[str], None] = lambda s: None) -> np.ndarray:
    """The exact effect [probes, documents] of ``steps`` steps of ``optimizer`` ("sgd" or "adam", fresh for each
    document) at ``lr`` on each document's LM loss, on each probe's mean completion-token log-probability.

    Documents longer than ``max_length`` (default: the scan's window, the model's context up to 1024 tokens) are
    split into the scan's windows; the loss is the mean over all their scored tokens. The model runs in eval mode
    in float32 and gets its exact weights back (a state-dict copy) after each document and at the end.
    """
    import torch

    from hf_mirror.modeling import window_length

    if optimizer not in ("sgd", "adam"):
        raise InputError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    if steps < 1 or not lr > 0:
        raise InputError(f"Need steps >= 1 and lr > 0, got {steps} and {lr}.")
    if not probes or not documents:
        raise InputError("Need at least one document and one probe.")
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params):
        raise InputError("The tail-patch ground truth runs in float32: pass model.float().")
    max_length = window_length(model, tokenizer, max_length)
    overlap = max(1, max_length // 8)
    probe_batch = _probe_batch(tokenizer, probes)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in params]
    training = model.training
    model.eval()
    out = np.empty((len(probes), len(documents)), np.float64)
    t0 = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(True)
        base = _probe_logprobs(model, probe_batch)
        for j, doc in enumerate(documents):
            batch = _document_batch(tokenizer, doc["text"], max_length, overlap)
            opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                logp, keep = _token_logprobs(model, *batch)
                (-logp.sum() / keep.sum()).backward()
                opt.step()
            out[:, j] = _probe_logprobs(model, probe_batch) - base
            model.load_state_dict(saved)
            if (j + 1) % 100 == 0:
                log(f"tail-patch {optimizer}: {j + 1}/{len(documents)} documents ({time.perf_counter() - t0:.0f} s)")
    finally:
        model.load_state_dict(saved)
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        model.train(training)
    return out


def ground_truth(setup: Setup, variant: str, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 settings: dict | None = None) -> tuple[np.ndarray, float, Path]:
    """:func:`tail_patch_matrix` of a variant of :data:`VARIANTS` (or of ``settings``: optimizer, steps, lr) on the
    setup's documents and probes, computed once and then read from the cache (keyed by the full model's
    directory, the documents, the probes and the settings); the matrix, the seconds spent in this call (0 from
    the cache) and the cache file."""
    if settings is None:
        if variant not in VARIANTS:
            raise InputError(f"Unknown tail-patch variant {variant!r}; choose from {list(VARIANTS)}.")
        settings = VARIANTS[variant]
    key = cache_key({"full": setup.directory.name, "protocol": PROTOCOL, "variant": settings,
                     "documents": [(d["id"], d["text"]) for d in setup.documents],
                     "probes": [(p["id"], p["prompt"], p["completion"]) for p in setup.probes]})
    path = cache_root(cache_dir) / f"tail-patch-{variant}-{key}.npy"
    if path.exists():
        matrix = np.load(path)
        if matrix.shape == (len(setup.probes), len(setup.documents)):
            log(f"tail-patch {variant}: ground truth loaded from {path}")
            return matrix, 0.0, path
    t0 = time.perf_counter()
    matrix = tail_patch_matrix(setup.model, setup.tokenizer, setup.documents, setup.probes, log=log, **settings)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.save(f, matrix)
    tmp.replace(path)
    log(f"tail-patch {variant}: ground truth of {len(setup.documents)} documents in {seconds:.0f} s")
    return matrix, seconds, path


def linearity(setup: Setup, lr: float = SGD_LR, optimizer: str = "sgd", steps: int = 1) -> dict:
    """How linear the tail patch is at ``lr``: Pearson r of the matrices at ``lr`` and ``lr / 2`` (all entries, and
    the mean per probe) and the ratio of their norms (2 when linear)."""
    run = {"optimizer": optimizer, "steps": steps}
    full = tail_patch_matrix(setup.model, setup.tokenizer, setup.documents, setup.probes, lr=lr, **run)
    half = tail_patch_matrix(setup.model, setup.tokenizer, setup.documents, setup.probes, lr=lr / 2, **run)
    rows = [np.corrcoef(a, b)[0, 1] for a, b in zip(full, half, strict=True)]
    return {"lr": lr, "pearson": float(np.corrcoef(full.ravel(), half.ravel())[0, 1]),
            "pearson_per_probe": float(np.nanmean(rows)), "norm_ratio": float(np.linalg.norm(full) /
                                                                               np.linalg.norm(half)),
            "mean_abs_effect": float(np.abs(full).mean())}


# --- scoring ----------------------------------------------------------------------------------------------------

def _summary(shares: np.ndarray, spearmans: np.ndarray) -> dict:
    out = {}
    for name, values in (("top_k_share", shares), ("spearman", spearmans)):
        finite = values[np.isfinite(values)]
        out[name] = float(finite.mean()) if len(finite) else float("nan")
        out[f"{name}_stderr"] = float(finite.std(ddof=1) / np.sqrt(len(finite))) if len(finite) > 1 else float("nan")
        out[f"{name}_probes"] = int(len(finite))
        out[f"{name}_median"] = float(np.median(finite)) if len(finite) else float("nan")
    return out


def evaluate_matrix(scores: np.ndarray, truth: np.ndarray, k: int = K, metric=None) -> dict:
    """The ``tail_patch`` metric of a [probes, documents] score array against the ground truth: ``all``, ``tune``
    (even probe positions) and ``held_out`` (odd) summaries (mean, standard error and median of the top-k share and
    the Spearman correlation), and the per-probe values."""
    if metric is None:
        from benchmarks import load_metric

        metric = load_metric("tail_patch")
    if scores.shape != truth.shape:
        raise InputError(f"scores {scores.shape} and ground truth {truth.shape} differ in shape.")
    value = metric.compute(predictions=scores.tolist(), references=truth.tolist(), k=k)
    shares = np.array(value["top_k_share_per_probe"], np.float64)
    spearmans = np.array(value["spearman_per_probe"], np.float64)
    return {"all": _summary(shares, spearmans), "tune": _summary(shares[0::2], spearmans[0::2]),
            "held_out": _summary(shares[1::2], spearmans[1::2]), "top_k_share_per_probe": shares.tolist(),
            "spearman_per_probe": spearmans.tolist()}


def source_mrr(scores: np.ndarray, setup: Setup) -> dict:
    """Retrieval of the documents that state each probe's answer (``setup.proponents``): per probe the reciprocal
    rank of its best-ranked proponent in ``scores`` (ties broken against it), then the mean over all probes, the tune
    half (even positions) and the held-out half (odd); probes without proponents are left out."""
    column = {d["id"]: j for j, d in enumerate(setup.documents)}
    per_probe = []
    for row, probe in zip(scores, setup.probes, strict=True):
        own = [column[d] for d in setup.proponents.get(probe["id"], []) if d in column]
        per_probe.append(1.0 / (int((row >= row[own].max()).sum() - 1) + 1) if own else float("nan"))
    values = np.array(per_probe, np.float64)
    return {"all": float(np.nanmean(values)), "tune": float(np.nanmean(values[0::2])),
            "held_out": float(np.nanmean(values[1::2])), "per_probe": per_probe}


def _chance(truth: np.ndarray, k: int) -> float:
    """The expected top-k share of a random order: mean over probes of mean(effect) / mean(best k effects)."""
    best = [np.sort(row)[::-1][:k].mean() for row in truth]
    finite = [row.mean() / b for row, b in zip(truth, best, strict=True) if b > 0]
    return float(np.mean(finite)) if finite else float("nan")


def proponent_ranks(truth: np.ndarray, setup: Setup) -> list[int | None]:
    """Per probe, the best rank (1 = the largest effect) that one of its proponents (``setup.proponents``: the
    documents that state its answer) has in its true effects; None for a probe without proponents."""
    column = {d["id"]: j for j, d in enumerate(setup.documents)}
    ranks = []
    for row, probe in zip(truth, setup.probes, strict=True):
        own = [column[d] for d in setup.proponents.get(probe["id"], []) if d in column]
        ranks.append(int((row > row[own].max()).sum()) + 1 if own else None)
    return ranks


def run_tail_patch(cfg: LDSConfig, methods: Sequence[str], cache_dir: str | Path | None = None,
                   output_dir: str | Path | None = None, show_progress: bool = False,
                   log: Callable[[str], None] = lambda s: None, variants: dict[str, dict] | None = None) -> dict:
    """Build the setup (:func:`benchmarks.lds.full_setup`), compute (or load) the ground truth of every variant
    (:data:`VARIANTS`, or ``variants``: name -> optimizer, steps, lr; one must be "sgd" and one "adam"), then score
    each method spec (:func:`benchmarks.lds.parse_method`, e.g. ``"mirror:steps=3"``) against it; a JSON-able
    report. A mirror method's own column (``raw_score``, beside the ``influence`` it is scored by) is reported as
    ``<spec>[mirror]``."""
    import torch

    from benchmarks import load_metric
    from benchmarks.variants import MIRROR_VARIANTS

    variants_in = VARIANTS if variants is None else variants
    if set(variants_in) != {"sgd", "adam"}:
        raise InputError(f"variants must be 'sgd' and 'adam', got {sorted(variants_in)}.")
    specs = {spec: parse_method(spec) for spec in methods}  # bad specs fail before any training
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_tail_patch_"))
    work.mkdir(parents=True, exist_ok=True)
    metric = load_metric("tail_patch")
    setup = full_setup(cfg, cache_dir, log)
    probe_ids, doc_ids = [p["id"] for p in setup.probes], [d["id"] for d in setup.documents]
    truths, variants = {}, {}
    for name, settings in variants_in.items():
        truths[name], seconds, path = ground_truth(setup, name, cache_dir, log, settings)
        variants[name] = {**settings, "seconds": seconds, "cache": str(path), "chance": _chance(truths[name], K),
                          "mean_abs_effect": float(np.abs(truths[name]).mean()),
                          "positive_share": float((truths[name] > 0).mean()),
                          "proponent_ranks": proponent_ranks(truths[name], setup)}
    report = {"config": asdict(cfg), "corpus": cfg.corpus, "python": platform.python_version(),
              "torch": torch.__version__, "documents": len(doc_ids), "probes": len(probe_ids),
              "correct": sum(p["correct"] for p in setup.probes), "k": K, "variants": variants,
              "sgd_predicts_adam": evaluate_matrix(truths["sgd"], truths["adam"], K, metric), "methods": {}}
    log(f"{cfg.corpus}: {len(doc_ids)} documents, {len(probe_ids)} probes")
    for spec, (method, options) in specs.items():
        t0 = time.perf_counter()
        where = work / "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
        scores = method_scores(method, setup, where, show_progress, **options)
        seconds = time.perf_counter() - t0
        columns = {spec: "score"}
        if method in MIRROR_VARIANTS and "raw_score" in scores:
            columns[f"{spec}[mirror]"] = "raw_score"
        for name, column in columns.items():
            matrix = score_matrix(scores, probe_ids, doc_ids, column)
            rows = {v: evaluate_matrix(matrix, truth, K, metric) for v, truth in truths.items()}
            report["methods"][name] = {"method": method, "mirror": options, "column": column, "seconds": seconds,
                                       "variants": rows, "source_mrr": source_mrr(matrix, setup)}
            log(f"{name}: " + ", ".join(f"{v} top-{K} share {r['all']['top_k_share']:.3f} spearman "
                                        f"{r['all']['spearman']:.3f}" for v, r in rows.items()) + f" ({seconds:.0f} s)")
    return report


def format_table(report: dict) -> str:
    """The report as a Markdown table: per method and variant, the top-k share and Spearman (mean +- standard
    error over all probes; tune and held-out halves), the share's median over all probes (the share is a ratio: a
    probe whose best top k raises it little while the method's top k lowers it a lot gives a large negative value)
    and the method's wall time; reference rows below."""
    k = report.get("k", K)
    lines = [f"| method | tail patch | top-{k} share | tune | held-out | median | Spearman | tune | held-out | "
             "wall time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cells(row: dict) -> str:
        a, t, h = row["all"], row["tune"], row["held_out"]
        return (f"{a['top_k_share']:.3f} ± {a['top_k_share_stderr']:.3f} | {t['top_k_share']:.3f} | "
                f"{h['top_k_share']:.3f} | {a.get('top_k_share_median', float('nan')):.3f} | "
                f"{a['spearman']:.3f} ± {a['spearman_stderr']:.3f} | {t['spearman']:.3f} | {h['spearman']:.3f}")

    for name, method in report["methods"].items():
        for variant, row in method["variants"].items():
            lines.append(f"| {name} | {_variant_label(report, variant)} | {cells(row)} | {method['seconds']:.1f} |")
    for variant, info in report["variants"].items():
        lines.append(f"| (random order, expected) | {_variant_label(report, variant)} | {info['chance']:.3f} | | | | "
                     f"0 | | | |")
    if "sgd_predicts_adam" in report:
        lines.append(f"| (exact SGD effect as the scores) | {_variant_label(report, 'adam')} | "
                     f"{cells(report['sgd_predicts_adam'])} | |")
    return "\n".join(lines)


def proponent_summary(report: dict) -> str:
    """One line per variant: how often the documents that state a probe's answer have the largest true effect."""
    lines = []
    for variant, info in report["variants"].items():
        ranks = [r for r in info.get("proponent_ranks", []) if r is not None]
        if ranks:
            lines.append(f"{_variant_label(report, variant)}: a document stating the answer has the largest effect "
                         f"for {sum(r == 1 for r in ranks)}/{len(ranks)} probes, is in the top 10 for "
                         f"{sum(r <= 10 for r in ranks)}/{len(ranks)} (median best rank {np.median(ranks):g}); "
                         f"{100 * info['positive_share']:.1f} % of the effects are positive")
    return "\n".join(lines)


def _variant_label(report: dict, variant: str) -> str:
    v = report["variants"][variant]
    return f"{v['optimizer']} {v['steps']} step{'s' if v['steps'] > 1 else ''} lr {v['lr']:g}"
