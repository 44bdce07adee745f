"""Candidate rules judged by tail-patch: when the mirror cannot scan every document, which ones should it scan?

Above :data:`hf_mirror.config.LINEAR_FULL_SCAN_MAX` documents the default scans each probe's candidates only, so the
influence column can only find what the candidate rule let through. This benchmark runs, on a tail-patch corpus
(:mod:`benchmarks.tail_patch`: capitals, WordNet, docstrings), the default mirror over every document (``all``) and
over each rule's candidates, with the same candidate budget per probe for every rule:

- ``bm25:2M``: each probe's top-2M documents by BM25 (the default rule, ``--candidates bm25:2M``);
- ``bm25+dense:M``: the union of its top-M by BM25 and its top-M by cosine similarity of the model's mean-pooled
  hidden states (``--retrievers bm25 dense`` with an index built by ``hf-mirror index --dense``).

Each run goes through :func:`hf_mirror.attribute` (the saved index of :func:`hf_mirror.retrieval.build_index`), and
is scored by the tail-patch metric of its ``influence`` column over each probe's own candidates, every other
document ranking below them (the scan reads the union of all probes' candidates, a sliver of a corpus large enough
to need candidates); ``recall`` is the share of each probe's true top-10 documents (by the ground truth's effect)
among its candidates. Rows are summarised over all probes and over the tune and held-out halves.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.lds import LDSConfig, full_setup, score_matrix
from benchmarks.tail_patch import VARIANTS, K, evaluate_matrix, ground_truth
from benchmarks.variants import run_method
from hf_mirror.errors import InputError

SIZES = (5, 10, 20)  # M: a rule's budget is 2M candidates per probe


def rules(sizes: Sequence[int] = SIZES) -> dict[str, dict]:
    """The candidate rules at each budget: name -> the ``ScanConfig`` settings that select them."""
    out = {}
    for m in sizes:
        if m < 1:
            raise InputError(f"candidate sizes must be positive, got {m}.")
        out[f"bm25:{2 * m}"] = {"candidates": 2 * m, "retrievers": ["bm25"]}
        out[f"bm25+dense:{m}"] = {"candidates": m, "retrievers": ["bm25", "dense"]}
    return out


def restricted_matrix(scores, probe_ids: Sequence[str], doc_ids: Sequence[str],
                      column: str = "influence") -> tuple[np.ndarray, np.ndarray]:
    """A result's ``column`` as a [probes, documents] array in which each probe's documents other than its own
    candidates (those with a BM25 score: its BM25 and dense ones) rank below them (ties among them), and the mask of
    its candidates. The scan reads the union of every probe's candidates, but on a corpus large enough to need
    candidates that union is a sliver of it: a probe's own candidates are what its rule found."""
    scanned = scores[scores[column].notna() & scores["bm25"].notna()]
    mask = score_matrix(scanned.assign(scanned=1.0), probe_ids, doc_ids, "scanned") > 0
    values = score_matrix(scanned, probe_ids, doc_ids, column)
    floor = np.where(mask, values, np.inf).min(axis=1, keepdims=True)
    floor = np.where(np.isfinite(floor), floor, 0.0) - 1.0
    return np.where(mask, values, floor), mask


def recall(mask: np.ndarray, truth: np.ndarray, k: int = K) -> dict:
    """Per probe, the share of its true top-``k`` documents (largest effect) among its scanned ones; the mean over
    all probes and over the tune (even) and held-out (odd) halves."""
    best = np.argsort(-truth, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(mask, best, axis=1).mean(axis=1)
    return {"all": float(values.mean()), "tune": float(values[0::2].mean()),
            "held_out": float(values[1::2].mean()), "per_probe": values.tolist()}


def run_candidates(cfg: LDSConfig, sizes: Sequence[int] = SIZES, cache_dir: str | Path | None = None,
                   output_dir: str | Path | None = None,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Build the setup and its tail-patch ground truth (both cached), the candidate index with dense vectors, then
    the default mirror over every document and over each rule's candidates; a JSON-able report."""
    import torch

    from hf_mirror.retrieval import build_index

    chosen = rules(sizes)
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_candidates_"))
    work.mkdir(parents=True, exist_ok=True)
    setup = full_setup(cfg, cache_dir, log)
    truths = {v: ground_truth(setup, v, cache_dir, log)[0] for v in VARIANTS}
    probe_ids, doc_ids = [p["id"] for p in setup.probes], [d["id"] for d in setup.documents]
    probes = [{"id": p["id"], "prompt": p["prompt"], "completion": p["completion"]} for p in setup.probes]
    t0 = time.perf_counter()
    index = build_index(setup.corpus(), setup.tokenizer, work / "index", model=setup.model, overwrite=True)
    report = {"config": asdict(cfg), "corpus": cfg.corpus, "torch": torch.__version__, "documents": len(doc_ids),
              "probes": len(probe_ids), "k": K, "index_seconds": time.perf_counter() - t0, "rules": {}}
    for name, settings in {"all": {"candidates": "all"}, **chosen}.items():
        t0 = time.perf_counter()
        scan = {"cache": False, "batch_size": 32, **settings}
        if "dense" in settings.get("retrievers", ()):
            scan["index"] = str(index.directory)
        result = run_method("mirror", setup.model, setup.corpus(), probes, tokenizer=setup.tokenizer,
                            output_dir=work / name.replace(":", "_").replace("+", "_"), scan=scan)
        matrix, mask = restricted_matrix(result.scores(), probe_ids, doc_ids)
        row = {"settings": settings, "seconds": time.perf_counter() - t0,
               "candidates_per_probe": float(mask.sum(axis=1).mean()), "variants": {}}
        for variant, truth in truths.items():
            row["variants"][variant] = {**evaluate_matrix(matrix, truth, K), "recall": recall(mask, truth, K)}
        report["rules"][name] = row
        log(f"{name}: {row['candidates_per_probe']:.1f} candidates per probe, " + ", ".join(
            f"{v} top-{K} share {r['all']['top_k_share']:.3f} recall {r['recall']['all']:.3f}"
            for v, r in row["variants"].items()))
    return report


def format_table(report: dict, half: str = "held_out") -> str:
    """The report as a Markdown table: per rule, its candidates per probe and, per variant, the top-k share,
    Spearman and recall of the true top k on one half of the probes."""
    variants = list(next(iter(report["rules"].values()))["variants"])
    head = ["rule", "candidates / probe"] + [f"{v}: {what}" for v in variants
                                              for what in (f"top-{report['k']} share", "Spearman", "recall")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in report["rules"].items():
        cells = [name, f"{row['candidates_per_probe']:.1f}"]
        for v in variants:
            r = row["variants"][v]
            cells += [f"{r[half]['top_k_share']:.3f}", f"{r[half]['spearman']:.3f}", f"{r['recall'][half]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
