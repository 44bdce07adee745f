"""Choosing how the default ranking combines lexical retrieval and the mirror, by data.

Every rule is computed from two full score tables of the same probes (BM25's and the mirror's raw influence),
so a benchmark runs each method once and then scores every rule on a *tune* half of its probes (the even
ones, in probe order) and reports it on the *held-out* half (the odd ones):

- ``mirror``: the mirror's raw score alone (the 0.1 default);
- ``bm25``: BM25 alone;
- ``rerank@M``: the mirror's order within each probe's BM25 top-M, the rest after them in BM25 order (what
  ``--candidates bm25:M`` scores);
- ``rrf``: reciprocal rank fusion, 1/(60 + BM25 rank) + 1/(60 + mirror rank) (Cormack et al., 2009);
- ``rrf@M``: the same within BM25's top-M (the candidates), the rest after them in BM25 order.

Benchmarks: ``wordnet`` (real dictionary text that the default model memorised; probes = a headword prompt
and the model's own continuation; the source entry is the answer) and ``fact_tracing`` (templated facts,
held-out query templates; every document that states the fact is an answer).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hf_mirror.evaluation.fact_tracing import rankings, retrieval_metrics
from hf_mirror.evaluation.variants import run_method

RRF_K = 60
RULES = ("mirror", "bm25", "rerank@20", "rerank@50", "rerank@100", "rrf", "rrf@20", "rrf@50", "rrf@100")


def _ranks(table: pd.DataFrame, column: str) -> pd.Series:
    """1-based rank of each row within its probe (score descending, ties by document id)."""
    ordered = table.assign(_neg=-table[column]).sort_values(["probe_id", "_neg", "doc_id"], kind="stable")
    return ordered.groupby("probe_id").cumcount().add(1).reindex(table.index)


def fuse(mirror: pd.DataFrame, bm25: pd.DataFrame, rule: str) -> pd.DataFrame:
    """``probe_id``, ``doc_id``, ``score`` of ``rule`` (one of :data:`RULES`) from the two score tables."""
    both = mirror[["probe_id", "doc_id", "raw_score"]].merge(
        bm25[["probe_id", "doc_id", "score"]].rename(columns={"score": "bm25"}), on=["probe_id", "doc_id"])
    both["doc_id"] = both["doc_id"].astype(str)
    r_bm25 = _ranks(both, "bm25")
    name, _, m = rule.partition("@")
    if name == "mirror":
        score = both["raw_score"].to_numpy(float)
    elif name == "bm25":
        score = both["bm25"].to_numpy(float)
    elif name in ("rerank", "rrf"):
        inside = (r_bm25 <= int(m)) if m else pd.Series(True, index=both.index)
        within = both[inside]
        key = (within["raw_score"] if name == "rerank" else
               1 / (RRF_K + _ranks(within, "bm25")) + 1 / (RRF_K + _ranks(within, "raw_score")))
        inner = _ranks(within.assign(_key=key), "_key").reindex(both.index).to_numpy(float)
        # the candidates first, in the rule's order; then the rest in BM25 order
        score = np.where(inside, 2.0 - inner / 1e7, 1.0 / (1.0 + r_bm25.to_numpy(float)))
    else:
        raise ValueError(f"unknown rule {rule!r}; choose from {RULES}")
    return both.assign(score=score)[["probe_id", "doc_id", "score"]]


def halves(probe_ids: Sequence[str]) -> dict[str, list[str]]:
    """The tune half (even positions) and the held-out half (odd positions) of the probes, in order."""
    ids = list(probe_ids)
    return {"tune": ids[0::2], "held_out": ids[1::2]}


def evaluate_rules(mirror: pd.DataFrame, bm25: pd.DataFrame, answers: dict[str, list[str]], k: int = 10,
                   rules: Sequence[str] = RULES) -> dict:
    """Every rule's MRR and recall@k on the tune and held-out halves of the probes that have answers."""
    split = halves([p for p in dict.fromkeys(mirror["probe_id"]) if p in answers])
    out = {}
    for rule in rules:
        fused = fuse(mirror, bm25, rule)
        out[rule] = {half: retrieval_metrics(rankings(fused, ids), answers, k) for half, ids in split.items()}
    return out


def choose(report: dict, k: int = 10) -> str:
    """The rule with the best tune-half MRR + recall@k, averaged over the benchmarks (ties: the earlier rule)."""
    rules = next(iter(report.values()))["rules"]
    means = {r: float(np.mean([b["rules"][r]["tune"]["mrr"] + b["rules"][r]["tune"][f"recall@{k}"]
                               for b in report.values()])) for r in rules}
    return max(means, key=lambda r: (means[r], -list(rules).index(r)))


@dataclass
class HybridConfig:
    """Sizes of the hybrid benchmark."""

    wordnet_probes: int = 40  # training entries of the default model used as probes (evenly spaced)
    fact_tracing: bool = True
    quick: bool = False  # small models and corpora (tests)
    top_k: int = 10
    batch_size: int = 32


def _wordnet(cfg: HybridConfig, work: Path, log: Callable[[str], None]) -> tuple:
    """Model, tokenizer, corpus, probes and answers of the memorised-real-text benchmark."""
    from hf_mirror import demo
    from hf_mirror.corpus import Corpus
    from hf_mirror.probes import Probe, generate_completions

    config = demo.DemoModelConfig.fast() if cfg.quick else demo.DemoModelConfig()
    model, tokenizer, _ = demo.load_default_model(config, show_progress=False)
    facts = demo.load_facts()
    if cfg.quick:
        facts = facts[:: demo.FAST_CORPUS_STRIDE]
    trained = demo.training_facts(demo.load_facts(), config)
    step = max(1, len(trained) // cfg.wordnet_probes)
    picks = trained[step // 2 :: step][: cfg.wordnet_probes]
    probes = generate_completions(model, tokenizer, [Probe(f["id"], f["prompt"]) for f in picks], 24)
    probes = [{"id": p.id, "prompt": p.prompt, "completion": p.completion} for p in probes]
    log(f"wordnet: {len(facts)} documents, {len(probes)} probes")
    corpus = Corpus([{"id": f["id"], "text": f["text"]} for f in facts], id_column="id")
    return model, tokenizer, corpus, probes, {p["id"]: [p["id"]] for p in probes}


def _fact_tracing(cfg: HybridConfig, work: Path, log: Callable[[str], None]) -> tuple:
    from hf_mirror.corpus import Corpus
    from hf_mirror.evaluation import fact_tracing as ft

    fcfg = ft.FactTracingConfig.quick() if cfg.quick else ft.FactTracingConfig()
    bench = ft.build_benchmark(fcfg)
    model, tokenizer, _ = ft.load_or_train(bench, fcfg, work / "fact_tracing_model", log)
    answers = [a for a in ft.answer_queries(model, tokenizer, bench, fcfg.max_new_tokens) if a["correct"]]
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in answers]
    log(f"fact tracing: {len(bench.documents)} documents, {len(probes)} correctly answered probes")
    corpus = Corpus([{"id": d["id"], "text": d["text"]} for d in bench.documents], id_column="id")
    return model, tokenizer, corpus, probes, {p["id"]: bench.proponents[p["id"]] for p in probes}


def run_hybrid(cfg: HybridConfig, output_dir: str | Path | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Score every rule on every benchmark (BM25 and the default mirror each run once, full scan)."""
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_hybrid_"))
    work.mkdir(parents=True, exist_ok=True)
    builders = {"wordnet": _wordnet, **({"fact_tracing": _fact_tracing} if cfg.fact_tracing else {})}
    report = {}
    for name, build in builders.items():
        model, tokenizer, corpus, probes, answers = build(cfg, work, log)
        t0 = time.perf_counter()
        scan = {"top_k": cfg.top_k, "batch_size": cfg.batch_size, "cache": False, "candidates": "all"}
        mirror = run_method("mirror", model, corpus, probes, tokenizer=tokenizer, output_dir=work / name / "mirror",
                            scan=scan).scores()
        t1 = time.perf_counter()
        bm25 = run_method("bm25", model, corpus, probes, tokenizer=tokenizer, output_dir=work / name / "bm25",
                          scan={"top_k": cfg.top_k}).scores()
        t2 = time.perf_counter()
        rules = evaluate_rules(mirror, bm25, answers, cfg.top_k)
        report[name] = {"documents": int(mirror["doc_id"].nunique()), "probes": len(probes),
                        "seconds": {"mirror": t1 - t0, "bm25": t2 - t1}, "rules": rules}
        log(format_table({name: report[name]}, cfg.top_k))
    report_json = {"config": asdict(cfg), "benchmarks": report, "chosen": choose(report, cfg.top_k)}
    (work / "hybrid.json").write_text(json.dumps(report_json, indent=2))
    return report_json


def format_table(benchmarks: dict, k: int = 10) -> str:
    """One Markdown table per benchmark: rule x (tune, held-out) MRR and recall@k."""
    out = []
    for name, b in benchmarks.items():
        out += [f"**{name}** ({b['documents']} documents, {b['probes']} probes)", "",
                f"| rule | tune MRR | tune recall@{k} | held-out MRR | held-out recall@{k} |",
                "| --- | --- | --- | --- | --- |"]
        for rule, row in b["rules"].items():
            t, h = row["tune"], row["held_out"]
            out.append(f"| {rule} | {t['mrr']:.3f} | {t[f'recall@{k}']:.3f} | {h['mrr']:.3f} | "
                       f"{h[f'recall@{k}']:.3f} |")
        out.append("")
    return "\n".join(out)
