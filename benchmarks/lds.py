"""Linear datamodeling score (LDS; Park et al., TRAK, 2023): do attribution scores predict retraining?

Protocol. A small GPT-2 is trained from scratch on a corpus: ``corpus="capitals"`` (the default) is the templated
fact-tracing corpus (:mod:`benchmarks.fact_tracing`, a small size), whose probes are the model's greedy
answers to held-out queries; ``corpus="wordnet"`` is real dictionary text, ``n_entries`` evenly spaced entries of the
bundled WordNet corpus (:func:`hf_mirror.demo.load_facts`) that the model memorises, whose probes are
``n_queries`` of those entries' headword prompts (``"bench:"``) with the model's own greedy continuation (its first
sentence); ``corpus="docstrings"`` is natural text without a template: ``n_entries`` first paragraphs of the
docstrings of public functions and classes of the Python standard library (:func:`docstring_pool`,
``"shutil.rmtree: Recursively delete a directory tree."``), probed the same way (``"shutil.rmtree:"``). Then
``n_subsets`` models are
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

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from benchmarks._common import cache_key, write_json
from benchmarks.variants import MIRROR_VARIANTS, run_method
from hf_mirror.errors import InputError

METHODS = ("mirror", "mirror_forward", "mirror_first_order", "mirror_raw", "mirror_zscore", "mirror_linear",
           "mirror_top2", "mirror_top2_linear", "bm25", "embedding", "gradsim", "ekfac", "bergson_ekfac", "trackstar")
CORPORA = ("capitals", "wordnet", "docstrings")


@dataclass
class LDSConfig:
    """Corpus, model and retraining sizes (model fields as in :class:`FactTracingConfig`).

    ``corpus="capitals"`` uses ``n_countries`` and ``n_templates``; ``corpus="wordnet"`` and ``"docstrings"`` use
    ``n_entries`` (start from :meth:`wordnet` / :meth:`docstrings`: their model fields fit real text).
    """

    corpus: Literal["capitals", "wordnet", "docstrings"] = "capitals"  # capital facts, WordNet or docstrings
    n_countries: int = 40  # capitals: fact-tracing corpus size (about 7 documents per country)
    n_entries: int = 400  # wordnet, docstrings: entries in the corpus (evenly spaced over the pool)
    n_queries: int = 20  # probes: the full model's answers to this many held-out queries (wordnet: headwords)
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

    @classmethod
    def wordnet(cls, quick: bool = False) -> LDSConfig:
        """The real-text benchmark: 400 WordNet entries (up to 62 tokens each), a 3-layer GPT-2 with a 1000-token
        BPE that memorises them in 60 epochs, 40 probes; ``quick``: 40 entries, 8 probes, a 2-layer model (tests)."""
        if quick:
            return cls(corpus="wordnet", n_entries=40, n_queries=8, n_subsets=6, vocab_size=300, n_layer=2,
                       n_embd=64, n_positions=64, epochs=30, max_new_tokens=16)
        return cls(corpus="wordnet", n_entries=400, n_queries=40, vocab_size=1000, n_positions=96,
                   max_new_tokens=24)

    @classmethod
    def docstrings(cls, quick: bool = False) -> LDSConfig:
        """Standard-library docstrings: 400 entries (40 to 300 characters of text), the model of :meth:`wordnet`
        with a 128-token context, 40 probes; ``quick``: 40 entries, 8 probes, a 2-layer model (tests)."""
        if quick:
            return cls(corpus="docstrings", n_entries=40, n_queries=8, n_subsets=6, vocab_size=300, n_layer=2,
                       n_embd=64, n_positions=96, epochs=30, max_new_tokens=16)
        return cls(corpus="docstrings", n_entries=400, n_queries=40, vocab_size=1000, n_positions=128,
                   max_new_tokens=32)

    @classmethod
    def for_corpus(cls, corpus: str = "capitals", quick: bool = False) -> LDSConfig:
        """The default (or ``quick``) configuration of ``corpus``."""
        if corpus not in CORPORA:
            raise InputError(f"Unknown LDS corpus {corpus!r}; choose from {list(CORPORA)}.")
        if corpus in ("wordnet", "docstrings"):
            return getattr(cls, corpus)(quick)
        return cls.quick() if quick else cls()

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise InputError(f"Unknown LDS corpus {self.corpus!r}; choose from {list(CORPORA)}.")

    def fact_tracing(self):
        from benchmarks.fact_tracing import FactTracingConfig

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
    documents: list[dict]  # id, text and country, relation (capitals) or headword (wordnet)
    probes: list[dict]  # id, prompt, completion, correct, answer
    proponents: dict[str, list[str]]
    directory: Path

    def corpus(self):
        from hf_mirror.corpus import Corpus

        return Corpus([{"id": d["id"], "text": d["text"]} for d in self.documents], id_column="id")

    @property
    def texts(self) -> list[str]:
        return [d["text"] for d in self.documents]


def _train_fields(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "epochs",
                                         "batch_size", "lr", "seed")}


def _full_model(texts: list[str], train: dict, cache_dir, log: Callable[[str], None]) -> tuple[object, object, Path]:
    """A GPT-2 trained from scratch on ``texts`` (:func:`hf_mirror.tiny_lm.train_tiny_lm` with ``train``), or the
    one cached under the key of the texts and settings; model, tokenizer and its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_mirror.tiny_lm import train_tiny_lm

    directory = cache_root(cache_dir) / f"full-{cache_key({'texts': texts, 'train': train})}"
    if (directory / "COMPLETE").exists():
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        log(f"full model loaded from {directory}")
        return model, tokenizer, directory
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    model, tokenizer = train_tiny_lm(texts, **train)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    (directory / "COMPLETE").write_text("")  # written last: marks a complete model
    log(f"full model trained in {time.perf_counter() - t0:.0f} s ({len(texts)} documents)")
    return model, tokenizer, directory


def full_setup(cfg, cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> Setup:
    """Build the corpus, train (or load from the cache) the full model and answer the queries.

    ``cfg`` is an :class:`LDSConfig` or :class:`~benchmarks.loo.LOOConfig` (anything with a
    ``fact_tracing()`` method; ``cfg.corpus="wordnet"`` builds the WordNet setup, :func:`wordnet_setup`, and
    ``"docstrings"`` the standard-library docstrings, :func:`docstrings_setup`). The full
    model of the capitals corpus is the fact-tracing benchmark's (:func:`hf_mirror.tiny_lm.train_tiny_lm`);
    retrains reuse its tokenizer and configuration.
    """
    from benchmarks.fact_tracing import answer_queries, build_benchmark

    corpus = getattr(cfg, "corpus", "capitals")
    if corpus == "wordnet":
        return wordnet_setup(cfg, cache_dir, log)
    if corpus == "docstrings":
        return docstrings_setup(cfg, cache_dir, log)
    ft = cfg.fact_tracing()
    bench = build_benchmark(ft)
    texts = [d["text"] for d in bench.documents]
    model, tokenizer, directory = _full_model(texts, _train_fields(ft), cache_dir, log)
    answers = answer_queries(model, tokenizer, bench, ft.max_new_tokens)
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"], "correct": a["correct"],
               "answer": a["answer"]} for a in answers if a["completion"].strip()]
    return Setup(model, tokenizer, bench.documents, probes, bench.proponents, directory)


def spaced_entries(pool: Sequence[dict], n_entries: int, n_queries: int) -> tuple[list[dict], list[dict]]:
    """``n_entries`` evenly spaced entries of ``pool`` (its order) and ``n_queries`` of them, evenly spaced among
    those (the probes' entries)."""
    if not 2 <= n_entries <= len(pool):
        raise InputError(f"n_entries must be between 2 and {len(pool)} (the entries available), got {n_entries}.")
    if not 1 <= n_queries <= n_entries:
        raise InputError(f"Need 1 <= n_queries <= n_entries, got {n_queries} and {n_entries}.")
    entries = [pool[i * len(pool) // n_entries] for i in range(n_entries)]
    picks = [entries[(2 * i + 1) * n_entries // (2 * n_queries)] for i in range(n_queries)]
    return entries, picks


def wordnet_entries(n_entries: int, n_queries: int) -> tuple[list[dict], list[dict]]:
    """``n_entries`` evenly spaced bundled WordNet entries (corpus order) and ``n_queries`` of them, evenly spaced
    among those (the probes' entries)."""
    from hf_mirror.demo import load_facts

    return spaced_entries(load_facts(), n_entries, n_queries)


def docstring_pool() -> list[dict]:
    """Every usable entry of the docstrings corpus (:func:`benchmarks.docstrings.read_pool`: the first paragraphs of
    the public functions' and classes' docstrings of :data:`~benchmarks.docstrings.MODULES`), as ``id`` (the
    qualified name, also ``headword``), ``text`` (``"shutil.rmtree: Recursively delete a directory tree."``),
    ``prompt`` (``"shutil.rmtree:"``) and ``completion``. Read in a fresh isolated interpreter (``python -I -S``):
    libraries patch the standard library when imported (torch replaces ``inspect.getfile``), and the corpus must not
    depend on what the caller imported. Deterministic for a given Python version (docstrings change slightly
    between versions)."""
    import subprocess
    import sys

    script = Path(__file__).with_name("docstrings.py")
    done = subprocess.run([sys.executable, "-I", "-S", str(script)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise InputError(f"Reading the standard library's docstrings failed: {done.stderr.strip()[-500:]}")
    pool = []
    for qualified, text in json.loads(done.stdout):
        pool.append({"id": qualified, "headword": qualified, "text": f"{qualified}: {text}", "prompt": f"{qualified}:",
                     "completion": f" {text}"})
    return pool


def docstring_entries(n_entries: int, n_queries: int) -> tuple[list[dict], list[dict]]:
    """``n_entries`` evenly spaced entries of :func:`docstring_pool` and ``n_queries`` of them (the probes')."""
    return spaced_entries(docstring_pool(), n_entries, n_queries)


def first_sentence(text: str, before_space: bool = False) -> str:
    """``text`` up to and including its first full stop (all of it when there is none); with ``before_space`` only
    a full stop followed by whitespace or ending the text counts (the dots of ``os.stat()`` do not)."""
    match = re.search(r"\.(?=\s|$)" if before_space else r"\.", text)
    return text[: match.end()] if match else text


def memorised_setup(cfg, entries: Sequence[dict], picks: Sequence[dict], cache_dir: str | Path | None = None,
                    log: Callable[[str], None] = lambda s: None, before_space: bool = False) -> Setup:
    """A GPT-2 trained from scratch on ``entries`` (``id``, ``text``, ``headword``); the probes are the ``picks``'
    prompts (``"bench:"``) with the model's greedy continuation (``cfg.max_new_tokens`` tokens cut after the first
    sentence, :func:`first_sentence` with ``before_space``). A probe is ``correct`` when its completion starts the
    entry's own ``completion`` (memorised); its proponent is its entry."""
    from hf_mirror.modeling import prepare_tokenizer
    from hf_mirror.probes import Probe, generate_completions

    documents = [{"id": e["id"], "text": e["text"], "headword": e["headword"]} for e in entries]
    model, tokenizer, directory = _full_model([d["text"] for d in documents], _train_fields(cfg), cache_dir, log)
    prepare_tokenizer(tokenizer)
    queries = [Probe(f"{e['id']}-probe", e["prompt"]) for e in picks]
    generated = generate_completions(model, tokenizer, queries, cfg.max_new_tokens)
    probes, proponents = [], {}
    for e, g in zip(picks, generated, strict=True):
        completion = first_sentence(g.completion or "", before_space)
        if not completion.strip():
            continue
        probes.append({"id": g.id, "prompt": g.prompt, "completion": completion,
                       "correct": e["completion"].startswith(completion), "answer": e["completion"]})
        proponents[g.id] = [e["id"]]
    return Setup(model, tokenizer, documents, probes, proponents, directory)


def wordnet_setup(cfg, cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> Setup:
    """The real-text setup (:func:`memorised_setup`): a GPT-2 trained from scratch on ``cfg.n_entries`` WordNet
    entries; the probes are ``cfg.n_queries`` entries' headword prompts (``"bench:"``) with the model's greedy
    continuation cut after the first sentence (the gloss)."""
    return memorised_setup(cfg, *wordnet_entries(cfg.n_entries, cfg.n_queries), cache_dir, log)


def docstrings_setup(cfg, cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> Setup:
    """The natural-text setup without a template (:func:`memorised_setup`): a GPT-2 trained from scratch on
    ``cfg.n_entries`` standard-library docstrings (:func:`docstring_entries`); the probes are ``cfg.n_queries``
    entries' qualified-name prompts (``"shutil.rmtree:"``) with the model's greedy continuation cut after the
    first sentence (a full stop before whitespace: the text is full of dotted names)."""
    return memorised_setup(cfg, *docstring_entries(cfg.n_entries, cfg.n_queries), cache_dir, log, before_space=True)


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
    key = cache_key({"full": setup.directory.name, "masks": masks.astype(int).tolist(), "train": train,
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
        write_json(path, {"subset": s, "documents": int(masks[s].sum()), "losses": losses[s].tolist()})
        log(f"subset {s + 1}/{cfg.n_subsets} retrained in {time.perf_counter() - t0:.0f} s")
    retrains = Retrains([d["id"] for d in setup.documents], masks, [p["id"] for p in setup.probes], losses,
                        full_losses, {"lds_config": asdict(cfg), "cache": str(directory)}, spent)
    write_json(directory / "retrains.json", retrains.to_json())
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
    return lds_of_matrix(score_matrix(scores, retrains.probe_ids, retrains.doc_ids, column), retrains)


def lds_of_matrix(matrix: np.ndarray, retrains: Retrains) -> dict:
    """:func:`lds_from_scores` of a [probes, documents] score array in the retrains' order."""
    from benchmarks import load_metric

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


def lexical_prior_lds(mirror: np.ndarray, bm25: np.ndarray, retrains: Retrains,
                      weights: Sequence[float]) -> dict[float, dict]:
    """LDS of :func:`hf_mirror.fusion.influence` of the mirror's and BM25's [probes, documents] scores for each
    lexical weight: over every probe, the tune half (even positions) and the held-out half (odd positions)."""
    from hf_mirror.fusion import influence

    out = {}
    for weight in weights:
        blended = np.stack([influence(m, b, weight) for m, b in zip(mirror, bm25, strict=True)])
        per_probe = lds_of_matrix(blended, retrains)["per_probe"]
        values = np.array([per_probe[p] for p in retrains.probe_ids], np.float64)
        halves = {"all": values, "tune": values[0::2], "held_out": values[1::2]}
        out[float(weight)] = {**{k: float(np.nanmean(v)) for k, v in halves.items()}, "per_probe": values.tolist()}
    return out


BENCHMARK_SCAN = {"cache": False, "batch_size": 32, "candidates": "all"}  # the mirror variants' scan, unless they say


def method_scores(method: str, setup: Setup, work: Path, show_progress: bool = False, scan: dict | None = None,
                  **options):
    """Run ``method`` (``mirror``/``mirror_raw`` or a baseline name) on the full model; its scores DataFrame.

    ``mirror`` is :func:`hf_mirror.attribute` with default settings, the other ``mirror_*`` names the variants of
    :data:`benchmarks.variants.MIRROR_VARIANTS` (e.g. ``mirror_zscore``: ``normalize="zscore"``,
    ``mirror_top2_linear``: every linear layer of the top 2 blocks); for them ``options`` go to ``MirrorConfig``
    (e.g. ``steps=10``) and ``scan`` to ``ScanConfig`` (e.g. ``{"aggregate": "sum"}``); for a baseline ``options``
    go to its class. A variant's own scan settings win over the benchmarks' (:data:`BENCHMARK_SCAN`: every
    document scanned), and ``scan`` over both.
    """
    probes = [{"id": p["id"], "prompt": p["prompt"], "completion": p["completion"]} for p in setup.probes]
    if method not in MIRROR_VARIANTS:
        if scan:
            raise InputError("scan options apply to the mirror methods only.")
        return run_method(method, setup.model, setup.corpus(), probes, tokenizer=setup.tokenizer,
                          output_dir=work / method, show_progress=show_progress, **options).scores()
    result = run_method(method, setup.model, setup.corpus(), probes, tokenizer=setup.tokenizer,
                        output_dir=work / method, show_progress=show_progress,
                        scan={**BENCHMARK_SCAN, **MIRROR_VARIANTS[method][0], **(scan or {})}, mirror=options)
    scores = result.scores()
    # the hybrid's final score ranks candidates only: a linear datamodel sums the influence column of every document
    return scores.assign(score=scores["influence"]) if "influence" in scores else scores


def parse_method(spec: str) -> tuple[str, dict]:
    """``"mirror:steps=32:target_rise=1"`` -> ("mirror", {"steps": 32, "target_rise": 1}): a method of
    :data:`METHODS` and, for the mirror methods, ``MirrorConfig`` overrides (``variants.parse_method``)."""
    from benchmarks.variants import parse_method as parse

    return parse(spec, METHODS)


def _probe_rise(directory: Path) -> float | None:
    """The mean rise of the probe loss under the mirrors of the run saved in ``directory`` (None without)."""
    from hf_mirror.results import AttributionResult

    try:
        records = AttributionResult.load(directory).probe_records
    except Exception:  # a baseline's result, or a layout without the fit record
        return None
    rises = [r["probe_loss_after"] - r["probe_loss_before"] for r in records
             if r.get("probe_loss_after") is not None and r.get("probe_loss_before") is not None]
    return float(np.mean(rises)) if rises else None


def run_lds(cfg: LDSConfig, methods: Sequence[str] = METHODS, cache_dir: str | Path | None = None,
            output_dir: str | Path | None = None, show_progress: bool = False,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Train (or load) the full model and the retrained subsets, then score each method; a JSON-able report.

    A method is a name of :data:`METHODS`, optionally with mirror settings (:func:`parse_method`:
    ``"mirror:steps=10"``, ``"mirror:target_rise=1:steps=32"``); each becomes a row keyed by its spec.
    """
    from hf_mirror.mirror import MirrorConfig

    specs = {spec: parse_method(spec) for spec in methods}  # unknown names and bad settings fail before training
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_lds_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup, retrains = load_or_train(cfg, cache_dir=cache_dir, log=log)
    spread = retrains.losses.std(axis=0)
    report = {"config": asdict(cfg), "corpus": cfg.corpus, "documents": len(setup.documents),
              "probes": len(setup.probes), "correct": sum(p["correct"] for p in setup.probes),
              "subset_documents": int(retrains.masks[0].sum()), "retrain_seconds": retrains.seconds,
              "setup_seconds": time.perf_counter() - t0, "cache": retrains.config["cache"],
              "loss_spread": float(spread.mean()), "mirror_config": asdict(MirrorConfig()), "methods": {}}
    log(f"{cfg.corpus}: {len(setup.documents)} documents, {len(setup.probes)} probes, {cfg.n_subsets} subsets; mean "
        f"std of a probe's loss across subsets {spread.mean():.3f}")
    for spec, (method, options) in specs.items():
        t1 = time.perf_counter()
        where = work / "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
        scores = method_scores(method, setup, where, show_progress, **options)
        seconds = time.perf_counter() - t1
        columns = {spec: "score"}  # a mirror's influence column, and its own column beside it as <spec>[mirror]
        if method in MIRROR_VARIANTS and "raw_score" in scores:
            columns[f"{spec}[mirror]"] = "raw_score"
        for name, column in columns.items():
            row = lds_from_scores(scores, retrains, column)
            values = np.array([row["per_probe"][p] for p in retrains.probe_ids], np.float64)
            row["tune"], row["held_out"] = float(np.nanmean(values[0::2])), float(np.nanmean(values[1::2]))
            right = [row["per_probe"][p["id"]] for p in setup.probes if p["correct"]]
            right = [v for v in right if np.isfinite(v)]
            row["lds_correct"] = float(np.mean(right)) if right else float("nan")  # probes answered correctly
            report["methods"][name] = {**row, "seconds": seconds, "method": method, "mirror": options,
                                       "column": column, "probe_rise": _probe_rise(where / method)
                                       if method in MIRROR_VARIANTS else None}
            log(f"{name}: LDS {row['lds']:.3f} +- {row['stderr']:.3f} over {row['n_probes']} probes ({seconds:.0f} s)")
    return report


def format_table(report: dict) -> str:
    """The report's methods as a Markdown table."""
    lines = ["| method | LDS (mean over probes) | std. error | tune half | held-out half | probes | LDS, correct "
             "answers only | wall time (s) | mean probe-loss rise (nats) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, row in report["methods"].items():
        rise = row.get("probe_rise")
        lines.append(f"| {method} | {row['lds']:.3f} | {row['stderr']:.3f} | {row.get('tune', float('nan')):.3f} | "
                     f"{row.get('held_out', float('nan')):.3f} | {row['n_probes']} | "
                     f"{row.get('lds_correct', float('nan')):.3f} | {row['seconds']:.1f} | "
                     f"{'' if rise is None else f'{rise:.2f}'} |")
    return "\n".join(lines)
