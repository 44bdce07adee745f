"""Linear datamodeling score (LDS; Park et al., TRAK, 2023): do attribution scores predict retraining?

Protocol. A small GPT-2 is trained on the fact-tracing corpus (:mod:`hf_mirror.evaluation.fact_tracing`, a
small size); its greedy answers to the held-out queries are the probes. Then ``n_subsets`` models are
retrained from scratch, each on a random ``fraction`` of the documents, with the full model's tokenizer,
architecture, hyperparameters, initialisation seed and data order (each epoch's shuffle of the full corpus,
restricted to the subset). The *actual* output of subset ``S`` on probe ``p`` is the retrained model's probe
loss (mean completion-token cross-entropy, prompt tokens excluded, as the mirror's probe loss).

A method's *predicted* output for ``S`` is the sum of its scores over the documents of ``S`` (the linear
datamodel). Every method here scores "higher = supports the probe", and including a supporting document
*lowers* the probe loss, so the prediction is correlated with the **negative** loss:
``LDS(p) = spearman(predicted(p, S_1..S_m), -loss(p, S_1..S_m))``, averaged over probes. +1 = the method's
scores order the subsets exactly as retraining does; 0 = no better than chance.

The retrained subsets' losses are cached on disk (:func:`load_or_train`, keyed by the corpus, the training
settings and the subsets), so any method or mirror setting can be re-scored against them cheaply with
:func:`lds_from_scores`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.errors import InputError
from hf_mirror.evaluation.variants import MIRROR_VARIANTS, run_method

METHODS = ("mirror", "mirror_raw", "mirror_zscore", "mirror_linear", "mirror_top2", "mirror_top2_linear", "bm25",
           "embedding", "gradsim", "ekfac")


@dataclass
class LDSConfig:
    """Corpus, model and retraining sizes (model fields as in :class:`FactTracingConfig`)."""

    n_countries: int = 40  # fact-tracing corpus size (about 7 documents per country)
    n_queries: int = 20  # probes: the full model's answers to this many held-out queries
    n_subsets: int = 24  # retrained models
    fraction: float = 0.5  # share of the documents in each subset
    subset_seed: int = 1  # draws the subsets
    seed: int = 0  # corpus shuffle, model initialisation and data order (the same for every retrain)
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
    def quick(cls) -> LDSConfig:
        """A size for tests: a few seconds per retrain on one CPU thread."""
        return cls(n_countries=8, n_queries=8, n_subsets=6, vocab_size=300, n_layer=2, n_embd=64, epochs=30)

    def fact_tracing(self):
        from hf_mirror.evaluation.fact_tracing import FactTracingConfig

        return FactTracingConfig.sharing(self)


# --- training on a subset, exactly as train_tiny_lm but with a fixed tokenizer ------------------------------

def train_subset(texts: Sequence[str], keep: Sequence[bool], tokenizer, model_config, *, epochs: int,
                 batch_size: int, lr: float, seed: int):
    """A GPT-2 trained from scratch on the ``texts`` with ``keep`` true, with the full model's tokenizer and
    config and the full run's data order (:func:`hf_mirror.tiny_lm.fit_lm`); with every document kept it
    equals :func:`hf_mirror.tiny_lm.train_tiny_lm` on the same texts (tested)."""
    from hf_mirror.tiny_lm import fit_lm

    try:
        return fit_lm(texts, tokenizer, model_config, keep=keep, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed)
    except ValueError as e:
        raise InputError(str(e)) from e


def probe_losses(model, tokenizer, probes: Sequence[dict]) -> np.ndarray:
    """Each probe's mean completion-token loss (prompt excluded) under ``model``."""
    import torch

    from hf_mirror.probes import Probe, encode_probe

    out = np.empty(len(probes), np.float64)
    with torch.no_grad():
        for i, p in enumerate(probes):
            batch = encode_probe(tokenizer, Probe(p["id"], p["prompt"], p["completion"]))
            out[i] = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    return out


def draw_subsets(n_documents: int, n_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """``n_subsets`` boolean masks [subsets, documents], each keeping round(fraction x n) documents."""
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be between 0 and 1, got {fraction}.")
    if n_subsets < 2:
        raise InputError("LDS needs at least 2 subsets.")
    size = max(1, round(fraction * n_documents))
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_documents), bool)
    for s in range(n_subsets):
        masks[s, rng.permutation(n_documents)[:size]] = True
    return masks


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from hf_mirror.cache import default_cache_dir

    return default_cache_dir() / "counterfactual"


# --- the full model and its probes (shared by LDS and leave-one-out) ------------------------------------------

@dataclass
class Setup:
    """The full model trained on the corpus, the corpus and the probes (the full model's answers)."""

    model: object
    tokenizer: object
    documents: list[dict]  # id, text, country, relation
    probes: list[dict]  # id, prompt, completion, correct, answer
    proponents: dict[str, list[str]]
    directory: Path

    def corpus(self):
        from hf_mirror.corpus import Corpus

        return Corpus([{"id": d["id"], "text": d["text"]} for d in self.documents], id_column="id")

    @property
    def texts(self) -> list[str]:
        return [d["text"] for d in self.documents]


def full_setup(cfg, cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> Setup:
    """Build the corpus, train (or load from the cache) the full model and answer the queries.

    ``cfg`` is an :class:`LDSConfig` or :class:`~hf_mirror.evaluation.loo.LOOConfig` (anything with a
    ``fact_tracing()`` method). The full model is the fact-tracing benchmark's
    (:func:`hf_mirror.tiny_lm.train_tiny_lm`); retrains reuse its tokenizer and configuration.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_mirror.evaluation.fact_tracing import answer_queries, build_benchmark, train_model

    ft = cfg.fact_tracing()
    bench = build_benchmark(ft)
    train = {k: getattr(ft, k) for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "epochs",
                                          "batch_size", "lr", "seed")}
    texts = [d["text"] for d in bench.documents]
    directory = cache_root(cache_dir) / f"full-{_key({'texts': texts, 'train': train})}"
    if (directory / "COMPLETE").exists():
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        log(f"full model loaded from {directory}")
    else:
        t0 = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        model, tokenizer = train_model(bench, ft)
        tokenizer.save_pretrained(directory)
        model.save_pretrained(directory)
        (directory / "COMPLETE").write_text("")  # written last: marks a complete model
        log(f"full model trained in {time.perf_counter() - t0:.0f} s ({len(texts)} documents)")
    answers = answer_queries(model, tokenizer, bench, ft.max_new_tokens)
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"], "correct": a["correct"],
               "answer": a["answer"]} for a in answers if a["completion"].strip()]
    return Setup(model, tokenizer, bench.documents, probes, bench.proponents, directory)


# --- retrained subsets and their cached losses ----------------------------------------------------------------

@dataclass
class Retrains:
    """Subset masks over ``doc_ids`` [subsets, documents] and each retrained model's probe losses [subsets, probes]."""

    doc_ids: list[str]
    masks: np.ndarray
    probe_ids: list[str]
    losses: np.ndarray
    full_losses: np.ndarray
    config: dict = field(default_factory=dict)
    seconds: float = 0.0  # retraining time spent in this call (0 when everything came from the cache)

    def to_json(self) -> dict:
        return {"doc_ids": self.doc_ids, "probe_ids": self.probe_ids, "masks": self.masks.astype(int).tolist(),
                "losses": self.losses.tolist(), "full_losses": self.full_losses.tolist(), "config": self.config}


def load_or_train(cfg: LDSConfig, setup: Setup | None = None, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda s: None) -> tuple[Setup, Retrains]:
    """The full model and the retrained subsets' probe losses, trained once and then read from the cache.

    Each subset's losses are written as soon as its model is trained, so an interrupted run resumes. The
    cache key covers the corpus, the training settings, the subsets and the probes.
    """
    setup = setup or full_setup(cfg, cache_dir, log)
    texts = setup.texts
    masks = draw_subsets(len(texts), cfg.n_subsets, cfg.fraction, cfg.subset_seed)
    train = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "seed")}
    key = _key({"full": setup.directory.name, "masks": masks.astype(int).tolist(), "train": train,
                "probes": [(p["id"], p["prompt"], p["completion"]) for p in setup.probes]})
    directory = cache_root(cache_dir) / f"lds-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    full_losses = probe_losses(setup.model, setup.tokenizer, setup.probes)
    losses = np.empty((cfg.n_subsets, len(setup.probes)), np.float64)
    spent = 0.0
    for s in range(cfg.n_subsets):
        path = directory / f"subset-{s:03d}.json"
        if path.exists():
            losses[s] = json.loads(path.read_text())["losses"]
            continue
        t0 = time.perf_counter()
        model = train_subset(texts, masks[s], setup.tokenizer, setup.model.config, **train)
        losses[s] = probe_losses(model, setup.tokenizer, setup.probes)
        spent += time.perf_counter() - t0
        _write_json(path, {"subset": s, "documents": int(masks[s].sum()), "losses": losses[s].tolist()})
        log(f"subset {s + 1}/{cfg.n_subsets} retrained in {time.perf_counter() - t0:.0f} s")
    retrains = Retrains([d["id"] for d in setup.documents], masks, [p["id"] for p in setup.probes], losses,
                        full_losses, {"lds_config": asdict(cfg), "cache": str(directory)}, spent)
    _write_json(directory / "retrains.json", retrains.to_json())
    return setup, retrains


# --- scoring ----------------------------------------------------------------------------------------------------

def score_matrix(scores, probe_ids: Sequence[str], doc_ids: Sequence[str], column: str = "score") -> np.ndarray:
    """A result's scores as a [probes, documents] array; a document a method did not score counts 0."""
    frame = scores.assign(doc_id=scores["doc_id"].astype(str), probe_id=scores["probe_id"].astype(str))
    table = frame.pivot_table(index="probe_id", columns="doc_id", values=column, aggfunc="sum")
    table = table.reindex(index=list(probe_ids), columns=[str(d) for d in doc_ids])
    return table.fillna(0.0).to_numpy(np.float64)


def lds_from_scores(scores, retrains: Retrains, column: str = "score") -> dict:
    """LDS of a method's scores (a DataFrame with ``probe_id``, ``doc_id`` and ``column``, as
    ``AttributionResult.scores()``) against cached retrains.

    Returns ``lds`` (mean over probes), ``stderr`` (standard error of that mean), ``n_probes`` (probes with a
    defined correlation) and ``per_probe``. Sign: predicted = sum of the subset's scores, correlated with the
    negative probe loss (higher score = supports = lower loss when included).
    """
    from hf_mirror.evaluation import load_metric

    matrix = score_matrix(scores, retrains.probe_ids, retrains.doc_ids, column)
    predicted = retrains.masks.astype(np.float64) @ matrix.T  # [subsets, probes]
    spearman = load_metric("spearman")
    per_probe = {}
    for j, pid in enumerate(retrains.probe_ids):
        value = spearman.compute(predictions=predicted[:, j].tolist(), references=(-retrains.losses[:, j]).tolist())
        per_probe[pid] = value["spearman"]
    values = np.array([v for v in per_probe.values() if np.isfinite(v)])
    if not len(values):
        return {"lds": float("nan"), "stderr": float("nan"), "n_probes": 0, "per_probe": per_probe}
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"lds": float(values.mean()), "stderr": stderr, "n_probes": int(len(values)), "per_probe": per_probe}


def method_scores(method: str, setup: Setup, work: Path, show_progress: bool = False, scan: dict | None = None,
                  **options):
    """Run ``method`` (``mirror``/``mirror_raw`` or a baseline name) on the full model; its scores DataFrame.

    ``mirror`` is :func:`hf_mirror.attribute` with default settings, the other ``mirror_*`` names the variants of
    :data:`hf_mirror.evaluation.variants.MIRROR_VARIANTS` (e.g. ``mirror_zscore``: ``normalize="zscore"``,
    ``mirror_top2_linear``: every linear layer of the top 2 blocks); for them ``options`` go to ``MirrorConfig``
    (e.g. ``steps=10``) and ``scan`` to ``ScanConfig`` (e.g. ``{"aggregate": "sum"}``); for a baseline ``options``
    go to its class.
    """
    probes = [{"id": p["id"], "prompt": p["prompt"], "completion": p["completion"]} for p in setup.probes]
    if method not in MIRROR_VARIANTS:
        if scan:
            raise InputError("scan options apply to the mirror methods only.")
        return run_method(method, setup.model, setup.corpus(), probes, tokenizer=setup.tokenizer,
                          output_dir=work / method, show_progress=show_progress, **options).scores()
    result = run_method(method, setup.model, setup.corpus(), probes, tokenizer=setup.tokenizer,
                        output_dir=work / method, show_progress=show_progress,
                        scan={"cache": False, "batch_size": 32, **(scan or {})}, mirror=options)
    return result.scores()


def run_lds(cfg: LDSConfig, methods: Sequence[str] = METHODS, cache_dir: str | Path | None = None,
            output_dir: str | Path | None = None, show_progress: bool = False,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Train (or load) the full model and the retrained subsets, then score each method; a JSON-able report."""
    from hf_mirror.mirror import MirrorConfig

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_lds_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup, retrains = load_or_train(cfg, cache_dir=cache_dir, log=log)
    spread = retrains.losses.std(axis=0)
    report = {"config": asdict(cfg), "documents": len(setup.documents), "probes": len(setup.probes),
              "correct": sum(p["correct"] for p in setup.probes), "subset_documents": int(retrains.masks[0].sum()),
              "retrain_seconds": retrains.seconds, "setup_seconds": time.perf_counter() - t0,
              "cache": retrains.config["cache"], "loss_spread": float(spread.mean()),
              "mirror_config": asdict(MirrorConfig()), "methods": {}}
    log(f"{len(setup.documents)} documents, {len(setup.probes)} probes, {cfg.n_subsets} subsets; mean std of a "
        f"probe's loss across subsets {spread.mean():.3f}")
    for method in methods:
        t1 = time.perf_counter()
        scores = method_scores(method, setup, work, show_progress)
        seconds = time.perf_counter() - t1
        row = lds_from_scores(scores, retrains)
        right = [row["per_probe"][p["id"]] for p in setup.probes if p["correct"]]
        right = [v for v in right if np.isfinite(v)]
        row["lds_correct"] = float(np.mean(right)) if right else float("nan")  # probes answered correctly
        report["methods"][method] = {**row, "seconds": seconds}
        log(f"{method}: LDS {row['lds']:.3f} +- {row['stderr']:.3f} over {row['n_probes']} probes ({seconds:.0f} s)")
    return report


def format_table(report: dict) -> str:
    """The report's methods as a Markdown table."""
    lines = ["| method | LDS (mean over probes) | std. error | probes | LDS, correct answers only | wall time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, row in report["methods"].items():
        lines.append(f"| {method} | {row['lds']:.3f} | {row['stderr']:.3f} | {row['n_probes']} | "
                     f"{row.get('lds_correct', float('nan')):.3f} | {row['seconds']:.1f} |")
    return "\n".join(lines)
