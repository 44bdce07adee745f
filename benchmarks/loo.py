"""Mirrored-hypothesis check: do mirror scores correlate with leave-one-out retraining?

The Mirrored Influence Hypothesis (Ko et al., 2024) says that train-to-test influence (how much training on
document d changes the loss on probe z) mirrors test-to-train influence (how much fitting z changes the loss
on d: the mirror score). This measures the first directly on a small model and correlates it with the second.

Protocol. The full model is the fact-tracing benchmark's (:func:`benchmarks.lds.full_setup`); the
probes are its answers to ``n_queries`` held-out queries. ``n_docs`` documents are picked: the probes'
proponents (the documents stating the queried facts; at most three quarters of ``n_docs``) plus randomly drawn
other documents. For each picked document the model is retrained without it, with everything else equal
(tokenizer, hyperparameters, initialisation seed, and the data order: each epoch's shuffle of the full corpus
with that document skipped; :func:`benchmarks.lds.train_subset`). The *actual* effect of document d
on probe p is ``loss_without_d(p) - loss_full(p)``: positive when d supports p (removing it raises the probe
loss), the sign of every attribution score here. Each method's score for the same (probe, document) pairs is
correlated with it: Pearson and Spearman over all pairs pooled, and Spearman within each probe averaged over
probes. Retrains are cached per document (:func:`benchmarks.lds.cache_root`).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import cache_key, write_json
from benchmarks.lds import (
    METHODS,
    Setup,
    cache_root,
    full_setup,
    method_scores,
    probe_losses,
    score_matrix,
    train_subset,
)
from hf_mirror.errors import InputError


@dataclass
class LOOConfig:
    """Corpus, model and leave-one-out sizes (model fields as in :class:`FactTracingConfig`)."""

    n_countries: int = 24
    n_queries: int = 8
    n_docs: int = 32  # documents left out, one retrain each (per training seed)
    train_seeds: int = 1  # average the effects over this many training seeds (each: 1 + n_docs retrains)
    doc_seed: int = 1  # draws the non-proponent documents
    seed: int = 0
    vocab_size: int = 500
    n_layer: int = 3
    n_embd: int = 96
    n_head: int = 4
    n_positions: int = 64
    epochs: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    max_new_tokens: int = 8
    n_templates: int = 3  # training templates per fact (the recorded figures used 3)

    @classmethod
    def quick(cls) -> LOOConfig:
        """A size for tests: a few seconds per retrain on one CPU thread."""
        return cls(n_countries=8, n_queries=8, n_docs=6, vocab_size=300, n_layer=2, n_embd=64, epochs=30)

    def fact_tracing(self):
        from benchmarks.fact_tracing import FactTracingConfig

        return FactTracingConfig.sharing(self)


@dataclass
class LeaveOneOut:
    """``effects[p, d]`` = probe loss without document d minus with it (positive = d supports p), averaged
    over training seeds."""

    probe_ids: list[str]
    doc_ids: list[str]
    effects: np.ndarray  # [probes, docs]
    full_losses: np.ndarray
    proponent: np.ndarray  # [probes, docs] bool: d states the fact probe p asks for
    cache: str = ""
    seconds: float = 0.0
    seed_effects: np.ndarray | None = None  # [seeds, probes, docs]; effects is their mean


def pick_documents(setup: Setup, n_docs: int, seed: int) -> list[str]:
    """The probes' proponents (at most 3/4 of ``n_docs``) plus randomly drawn other documents, in corpus order."""
    if n_docs < 2:
        raise InputError("Leave-one-out needs at least 2 documents.")
    rng = random.Random(seed)
    props = list(dict.fromkeys(d for p in setup.probes for d in setup.proponents.get(p["id"], [])))
    n_props = min(len(props), max(1, (3 * n_docs) // 4))
    chosen = set(rng.sample(props, n_props)) if n_props < len(props) else set(props)
    others = [d["id"] for d in setup.documents if d["id"] not in chosen]
    chosen |= set(rng.sample(others, min(len(others), n_docs - len(chosen))))
    return [d["id"] for d in setup.documents if d["id"] in chosen]


def load_or_train(cfg: LOOConfig, setup: Setup | None = None, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda s: None) -> tuple[Setup, LeaveOneOut]:
    """The full model and one retrain per picked document and training seed (cached per retrain: a rerun
    resumes). With ``train_seeds`` > 1 the effects are averaged over seeds ``seed, seed + 1, ...``: for each
    seed, a model on all documents and one without each document, both trained with that seed; the probes
    stay the seed-``seed`` model's answers. ``seed_effects`` keeps each seed's effects."""
    setup = setup or full_setup(cfg, cache_dir, log)
    doc_ids = pick_documents(setup, cfg.n_docs, cfg.doc_seed)
    train = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "seed")}
    key = cache_key({"full": setup.directory.name, "train": train,
                "probes": [(p["id"], p["prompt"], p["completion"]) for p in setup.probes]})
    directory = cache_root(cache_dir) / f"loo-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    index = {d["id"]: i for i, d in enumerate(setup.documents)}
    texts = setup.texts
    spent = 0.0

    def losses_without(doc_id: str | None, seed: int) -> np.ndarray:
        nonlocal spent
        if doc_id is None and seed == cfg.seed:
            return probe_losses(setup.model, setup.tokenizer, setup.probes)
        # seed cfg.seed files carry no seed in their name (caches written before train_seeds existed)
        name = {"doc": doc_id} if seed == cfg.seed else {"doc": doc_id, "seed": seed}
        path = directory / f"without-{cache_key(name)}.json"
        if path.exists():
            return np.asarray(json.loads(path.read_text())["losses"])
        t0 = time.perf_counter()
        keep = [doc_id is None or i != index[doc_id] for i in range(len(texts))]
        model = train_subset(texts, keep, setup.tokenizer, setup.model.config, **{**train, "seed": seed})
        losses = probe_losses(model, setup.tokenizer, setup.probes)
        spent += time.perf_counter() - t0
        write_json(path, {"doc_id": doc_id, "seed": seed, "losses": losses.tolist()})
        log(f"seed {seed}: retrained {'on everything' if doc_id is None else 'without ' + doc_id} in "
            f"{time.perf_counter() - t0:.0f} s")
        return losses

    seed_effects = []
    for seed in range(cfg.seed, cfg.seed + cfg.train_seeds):
        full = losses_without(None, seed)
        seed_effects.append(np.stack([losses_without(d, seed) - full for d in doc_ids], axis=1))
    proponent = np.array([[d in setup.proponents.get(p["id"], []) for d in doc_ids] for p in setup.probes])
    full = probe_losses(setup.model, setup.tokenizer, setup.probes)
    return setup, LeaveOneOut([p["id"] for p in setup.probes], doc_ids, np.mean(seed_effects, axis=0), full,
                              proponent, str(directory), spent, np.stack(seed_effects))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def loo_correlation(scores, loo: LeaveOneOut, column: str = "score") -> dict:
    """Correlation of a method's scores (a DataFrame as ``AttributionResult.scores()``) with the LOO effects.

    ``pearson``/``spearman``: over all (probe, document) pairs pooled; ``spearman_per_probe``: within each
    probe over the documents, averaged over probes (NaN ones dropped).
    """
    from benchmarks import load_metric

    matrix = score_matrix(scores, loo.probe_ids, loo.doc_ids, column)
    spearman = load_metric("spearman")
    x, y = matrix.ravel(), loo.effects.ravel()
    per_probe = [spearman.compute(predictions=matrix[i].tolist(), references=loo.effects[i].tolist())["spearman"]
                 for i in range(len(loo.probe_ids))]
    finite = [v for v in per_probe if np.isfinite(v)]
    return {"pearson": pearson(x, y), "spearman": spearman.compute(predictions=x.tolist(),
                                                                   references=y.tolist())["spearman"],
            "spearman_per_probe": float(np.mean(finite)) if finite else float("nan"), "pairs": int(len(x))}


def run_loo(cfg: LOOConfig, methods: Sequence[str] = ("mirror", "mirror_raw"), cache_dir: str | Path | None = None,
            output_dir: str | Path | None = None, show_progress: bool = False,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Train (or load) the full model and the leave-one-out retrains, then correlate each method; a report."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_loo_"))
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks import load_metric
    from hf_mirror.mirror import MirrorConfig

    setup, loo = load_or_train(cfg, cache_dir=cache_dir, log=log)
    props, others = loo.effects[loo.proponent], loo.effects[~loo.proponent]
    report = {"config": asdict(cfg), "documents": len(setup.documents), "probes": len(setup.probes),
              "correct": sum(p["correct"] for p in setup.probes), "left_out": loo.doc_ids,
              "retrain_seconds": loo.seconds, "cache": loo.cache,
              "effect": {"proponent_mean": float(props.mean()) if props.size else float("nan"),
                         "other_mean": float(others.mean()) if others.size else float("nan"),
                         "other_std": float(others.std()) if others.size else float("nan"),
                         "proponent_pairs": int(props.size), "other_pairs": int(others.size)},
              "mirror_config": asdict(MirrorConfig()), "methods": {}}
    if loo.seed_effects is not None and len(loo.seed_effects) > 1:
        # how reproducible LOO itself is: seed 0's effects against seed 1's (a ceiling for any method)
        a, b = loo.seed_effects[0].ravel(), loo.seed_effects[1].ravel()
        spearman = load_metric("spearman")
        report["seed_agreement"] = {
            "pearson": pearson(a, b),
            "spearman": spearman.compute(predictions=a.tolist(), references=b.tolist())["spearman"],
            "spearman_per_probe": float(np.nanmean([
                spearman.compute(predictions=x.tolist(), references=y.tolist())["spearman"]
                for x, y in zip(loo.seed_effects[0], loo.seed_effects[1], strict=True)]))}
        log(f"LOO reproducibility across two training seeds: {report['seed_agreement']}")
    log(f"LOO effect: proponents {report['effect']['proponent_mean']:+.4f} (mean), others "
        f"{report['effect']['other_mean']:+.4f} +- {report['effect']['other_std']:.4f}")
    for method in methods:
        t0 = time.perf_counter()
        scores = method_scores(method, setup, work, show_progress)
        row = {**loo_correlation(scores, loo), "seconds": time.perf_counter() - t0}
        report["methods"][method] = row
        log(f"{method}: pearson {row['pearson']:.3f}, spearman {row['spearman']:.3f}, per-probe spearman "
            f"{row['spearman_per_probe']:.3f}")
    return report


def format_table(report: dict) -> str:
    lines = ["| method | Pearson (all pairs) | Spearman (all pairs) | Spearman (per probe, mean) | wall time (s) |",
             "| --- | --- | --- | --- | --- |"]
    for method, row in report["methods"].items():
        lines.append(f"| {method} | {row['pearson']:.3f} | {row['spearman']:.3f} | {row['spearman_per_probe']:.3f} | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines)
