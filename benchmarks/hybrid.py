"""Choosing how the default ranking combines lexical retrieval and the mirror, by data.

Every rule is computed from two full score tables of the same probes (BM25's and the mirror's raw influence),
so a benchmark runs each method once and then scores every rule on a *tune* half of its probes (the even
ones, in probe order) and reports it on the *held-out* half (the odd ones):

- ``mirror``: the mirror's raw score alone (the 0.1 default);
- ``bm25``: BM25 alone;
- ``rerank@M``: the mirror's order within each probe's BM25 top-M, the rest after them in BM25 order (what
  ``--candidates bm25:M`` scores);
- ``rrf``: reciprocal rank fusion, 1/(60 + BM25 rank) + 1/(60 + mirror rank) (Cormack et al., 2009);
- ``rrf@M``: the same within BM25's top-M (the candidates), the rest after them in BM25 order;
- ``hybrid@M:w``: :func:`hf_mirror.fusion.fuse` over BM25's top-M, BM25 scaled to [0, 1] plus ``w`` times the
  mirror's z-score among the candidates (what ``attribute`` ranks by, ``rank_by="hybrid"``).

:func:`run_union` compares the candidate sets of issue #13's retrievers on the same tables: each probe's BM25 top-M
against its union with the dense index's top-M (``ScanConfig.retrieval.retrievers``), by candidate recall and by the
default hybrid ranking's MRR / recall@k over each set.

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
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.fact_tracing import rankings, retrieval_metrics
from benchmarks.variants import run_method
from hf_mirror.config import AUTO_CANDIDATES, ScanConfig

RRF_K = 60
DEFAULT_RULE = f"hybrid@{AUTO_CANDIDATES}:{ScanConfig().ranking.mirror_weight:g}"  # what `attribute` ranks by
PREVIOUS_DEFAULT = "hybrid@20:0.05"  # the default until 2026-12-01 (docs/benchmarks_hybrid.md), still compared
RULES = ("mirror", "bm25", "rerank@20", "rerank@50", "rerank@100", "rrf", "rrf@20", "rrf@50", "rrf@100",
         "hybrid@20:0.01", "hybrid@20:0.02", "hybrid@20:0.05", "hybrid@20:0.1", "hybrid@20:0.2", "hybrid@20:0.5",
         "hybrid@50:0.05", "hybrid@50:0.1", "hybrid@50:0.2", "hybrid@100:0.1")


def _ranks(table: pd.DataFrame, column: str) -> pd.Series:
    """1-based rank of each row within its probe (score descending, ties by document id)."""
    ordered = table.assign(_neg=-table[column]).sort_values(["probe_id", "_neg", "doc_id"], kind="stable")
    return ordered.groupby("probe_id").cumcount().add(1).reindex(table.index)


def fuse(mirror: pd.DataFrame, bm25: pd.DataFrame, rule: str,
         candidates: dict[str, set[str]] | None = None) -> pd.DataFrame:
    """``probe_id``, ``doc_id``, ``score`` of ``rule`` (one of :data:`RULES`) from the two score tables.

    ``candidates`` (probe id -> doc ids) replaces BM25's top M as a ``hybrid`` rule's candidates."""
    both = mirror[["probe_id", "doc_id", "raw_score"]].merge(
        bm25[["probe_id", "doc_id", "score"]].rename(columns={"score": "bm25"}), on=["probe_id", "doc_id"])
    both["doc_id"] = both["doc_id"].astype(str)
    r_bm25 = _ranks(both, "bm25")
    name, _, m = rule.partition("@")
    if name == "mirror":
        score = both["raw_score"].to_numpy(float)
    elif name == "bm25":
        score = both["bm25"].to_numpy(float)
    elif name == "hybrid":
        from hf_mirror.fusion import fuse as hybrid

        m, _, weight = m.partition(":")
        inside = (r_bm25 <= int(m) if candidates is None else
                  pd.Series([d in candidates.get(p, ()) for p, d in zip(both["probe_id"], both["doc_id"],
                                                                       strict=True)], index=both.index))
        chosen = both.assign(bm25=both["bm25"].where(inside), mirror=both["raw_score"])
        score = hybrid(chosen, float(weight)).fillna(-1e6 - r_bm25).to_numpy(float)  # the rest: in BM25 order
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


def per_probe(ranked: dict[str, list[str]], answers: dict[str, list[str]], k: int = 10) -> pd.DataFrame:
    """Each probe's reciprocal rank and recall@k (the bundled metrics, one probe at a time), indexed by probe id."""
    return pd.DataFrame({p: retrieval_metrics({p: ranked[p]}, answers, k) for p in ranked}).T


def paired(mirror: pd.DataFrame, bm25: pd.DataFrame, answers: dict[str, list[str]], rule: str,
           baseline: str = "bm25", k: int = 10, resamples: int = 10_000, seed: int = 0) -> dict:
    """``rule`` minus ``baseline`` per probe on each half: the mean difference of MRR and recall@k, a paired
    bootstrap 95% interval over probes, and how many probes each rule wins. It says whether a gap between two rules
    is larger than the probes' noise."""
    split = halves([p for p in dict.fromkeys(mirror["probe_id"]) if p in answers])
    rng = np.random.default_rng(seed)
    out = {}
    fused = fuse(mirror, bm25, rule), fuse(mirror, bm25, baseline)  # once, for both halves
    for half, ids in split.items():
        diff = per_probe(rankings(fused[0], ids), answers, k) - per_probe(rankings(fused[1], ids), answers, k)
        draws = rng.integers(0, len(diff), size=(resamples, len(diff)))
        out[half] = {metric: {"mean": float(d.mean()),
                              "ci95": [float(x) for x in np.percentile(d.to_numpy()[draws].mean(axis=1), [2.5, 97.5])],
                              "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}
                     for metric, d in diff.items()}
    return out


def choose(report: dict, k: int = 10) -> str:
    """The rule with the best tune-half MRR + recall@k, averaged over the benchmarks. Among rules tied on that, the
    best tune-half mean average precision (it still sees the order of a probe's answers where MRR and recall@k are
    saturated). Among rules tied on both, the simplest: the one that gives the mirror the least say (BM25 first)."""
    tied = list(next(iter(report.values()))["rules"])
    for metrics in (("mrr", f"recall@{k}"), ("map",)):
        means = {r: float(np.mean([sum(b["rules"][r]["tune"].get(m, 0.0) for m in metrics) for b in report.values()]))
                 for r in tied}
        tied = [r for r in tied if means[r] >= max(means.values()) - 1e-12]
    return min(tied, key=_mirror_say)


def _mirror_say(rule: str) -> float:
    name, _, arg = rule.partition("@")
    return {"mirror": 3.0, "rerank": 2.0, "rrf": 1.0, "bm25": 0.0}.get(name, float(arg.partition(":")[2] or 0))


@dataclass
class HybridConfig:
    """Sizes of the hybrid benchmark."""

    wordnet_probes: int = 40  # training entries of the default model used as probes (evenly spaced)
    wordnet: bool = True
    fact_tracing: bool = True
    comentions: bool = True  # also the fact-tracing variant with co-mention distractors
    countries: int = 100  # fact tracing: countries in the corpus, all of them queried (at most 228)
    seed: int = 0  # fact tracing: the corpus order and the model's training seed
    quick: bool = False  # small models and corpora (tests)
    top_k: int = 10
    batch_size: int = 32
    reuse: bool = True  # read back the score tables of an earlier run in the same output directory


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


def _fact_tracing(cfg: HybridConfig, work: Path, log: Callable[[str], None], comentions: bool = False) -> tuple:
    from benchmarks import fact_tracing as ft
    from hf_mirror.corpus import Corpus

    fcfg = (ft.FactTracingConfig.quick() if cfg.quick else
            ft.FactTracingConfig(n_countries=cfg.countries, n_queries=cfg.countries))
    fcfg.comentions, fcfg.seed = comentions, cfg.seed
    bench = ft.build_benchmark(fcfg)
    name = "fact_tracing_comentions_model" if comentions else "fact_tracing_model"
    model, tokenizer, _ = ft.load_or_train(bench, fcfg, work / name, log)
    answers = [a for a in ft.answer_queries(model, tokenizer, bench, fcfg.max_new_tokens) if a["correct"]]
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in answers]
    log(f"fact tracing: {len(bench.documents)} documents, {len(probes)} correctly answered probes")
    corpus = Corpus([{"id": d["id"], "text": d["text"]} for d in bench.documents], id_column="id")
    return model, tokenizer, corpus, probes, {p["id"]: bench.proponents[p["id"]] for p in probes}


def _scores(out: Path, method: str, inputs: tuple, scan: dict, reuse: bool) -> tuple[pd.DataFrame, float | None]:
    """A method's scores and wall time: read back from ``out`` when it holds a finished run of these probes."""
    from hf_mirror.results import AttributionResult

    model, corpus, probes, tokenizer = inputs
    if reuse and (out / "config.json").exists():
        done = AttributionResult.load(out)
        if [(p.id, p.completion) for p in done.probes] == [(p["id"], p["completion"]) for p in probes]:
            return done.scores(), done.config.get("stats", {}).get("seconds")
    t0 = time.perf_counter()
    scores = run_method(method, model, corpus, probes, tokenizer=tokenizer, output_dir=out, scan=scan).scores()
    return scores, time.perf_counter() - t0


def _workdir(output_dir: str | Path | None) -> Path:
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_hybrid_"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def _benchmarks(cfg: HybridConfig, work: Path, log: Callable[[str], None]):
    """Each benchmark's name, inputs (model, corpus, probes, tokenizer), answers and its two score tables (the
    mirror's full scan and BM25's), computed once and read back by later runs in ``work``."""
    builders = {**({"wordnet": _wordnet} if cfg.wordnet else {}),
                **({"fact_tracing": _fact_tracing} if cfg.fact_tracing else {}),
                **({"fact_tracing_comentions": partial(_fact_tracing, comentions=True)} if cfg.comentions else {})}
    for name, build in builders.items():
        model, tokenizer, corpus, probes, answers = build(cfg, work, log)
        inputs = (model, corpus, probes, tokenizer)
        full = {"top_k": cfg.top_k, "batch_size": cfg.batch_size, "cache": False, "candidates": "all"}
        mirror, t_mirror = _scores(work / name / "mirror", "mirror_only", inputs, full, cfg.reuse)
        bm25, t_bm25 = _scores(work / name / "bm25", "bm25", inputs, {"top_k": cfg.top_k}, cfg.reuse)
        yield name, inputs, answers, (mirror, t_mirror), (bm25, t_bm25)


def run_hybrid(cfg: HybridConfig, output_dir: str | Path | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Score every rule on every benchmark (BM25 and the default mirror each run once, full scan)."""
    work = _workdir(output_dir)
    report, tables = {}, {}
    for name, inputs, answers, (mirror, t_mirror), (bm25, t_bm25) in _benchmarks(cfg, work, log):
        probes = inputs[2]
        tables[name] = (mirror, bm25, answers)
        rules = evaluate_rules(mirror, bm25, answers, cfg.top_k)
        report[name] = {"documents": int(mirror["doc_id"].nunique()), "probes": len(probes),
                        "seconds": {"mirror": t_mirror, "bm25": t_bm25}, "rules": rules}
        log(format_table({name: report[name]}, cfg.top_k))
    chosen = choose(report, cfg.top_k)
    for name, b in report.items():  # the library's default rule against BM25, the chosen one and the previous default
        for key, rule in (("paired", DEFAULT_RULE), ("paired_chosen", chosen), ("paired_previous", PREVIOUS_DEFAULT)):
            if key == "paired" or rule not in (DEFAULT_RULE, "bm25"):
                b[key] = {"rule": rule, "baseline": "bm25", **paired(*tables[name], rule, k=cfg.top_k)}
    report_json = {"config": asdict(cfg), "benchmarks": report, "chosen": chosen}
    (work / "hybrid.json").write_text(json.dumps(report_json, indent=2))
    log(format_paired(report))
    return report_json


def format_paired(benchmarks: dict) -> str:
    """A rule (the default; the chosen one and the previous default too where they differ) against BM25, probe by
    probe: mean difference [95% interval] (probes won / lost)."""
    out = ["| benchmark | rule | half | metric | rule - BM25 | 95% interval | probes won / lost |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, b in benchmarks.items():
        for comparison in (b[k] for k in ("paired", "paired_chosen", "paired_previous") if k in b):
            for half in ("tune", "held_out"):
                for metric, d in comparison.get(half, {}).items():
                    out.append(f"| {name} | {comparison.get('rule', '')} | {half} | {metric} | {d['mean']:+.3f} | "
                               f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['wins']} / {d['losses']} |")
    return "\n".join(out)


def format_table(benchmarks: dict, k: int = 10) -> str:
    """One Markdown table per benchmark: rule x (tune, held-out) MRR and recall@k."""
    out = []
    for name, b in benchmarks.items():
        out += [f"**{name}** ({b['documents']} documents, {b['probes']} probes)", "",
                f"| rule | tune MRR | tune recall@{k} | tune MAP | held-out MRR | held-out recall@{k} | held-out MAP |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for rule, row in b["rules"].items():
            t, h = row["tune"], row["held_out"]
            out.append(f"| {rule} | {t['mrr']:.3f} | {t[f'recall@{k}']:.3f} | {t['map']:.4f} | {h['mrr']:.3f} | "
                       f"{h[f'recall@{k}']:.3f} | {h['map']:.4f} |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------- the mirror normalised across probes, inside the hybrid (#13)
NORMALIZED_RULES = ("bm25", "hybrid@20:0.05", "hybrid@20:0.1", "hybrid@20:0.2", "mirror")


def normalized(mirror: pd.DataFrame, method: str) -> pd.DataFrame:
    """The mirror's score table with each document's ``raw_score`` normalised across the probes as a run with
    ``ScoringConfig(normalize=method)`` does (:func:`hf_mirror.scoring.normalize_scores`), rows in the table's
    order."""
    from hf_mirror.scoring import normalize_scores

    if method == "none":
        return mirror
    wide = mirror.pivot(index="doc_id", columns="probe_id", values="raw_score")
    scores = np.stack([normalize_scores(row, method) for row in wide.to_numpy(np.float64)])
    long = pd.DataFrame(scores, index=wide.index, columns=wide.columns).stack().rename("raw_score").reset_index()
    return mirror[["probe_id", "doc_id"]].merge(long, on=["probe_id", "doc_id"], how="left")


def run_normalizations(cfg: HybridConfig, output_dir: str | Path | None = None,
                       log: Callable[[str], None] = lambda s: None) -> dict:
    """:data:`NORMALIZED_RULES` with the mirror's scores normalised each way of ``ScoringConfig.normalize``, from
    the same score tables as :func:`run_hybrid`: does comparing each document across the probes remove what the mirror
    shares between probes of one template?"""
    from hf_mirror.scoring import NORMALIZATIONS

    work = _workdir(output_dir)
    report = {}
    for name, _, answers, (mirror, _), (bm25, _) in _benchmarks(cfg, work, log):
        report[name] = {m: evaluate_rules(normalized(mirror, m), bm25, answers, cfg.top_k, NORMALIZED_RULES)
                        for m in NORMALIZATIONS}
    (work / "normalizations.json").write_text(json.dumps({"config": asdict(cfg), "benchmarks": report}, indent=2))
    return report


def format_normalizations(report: dict, k: int = 10) -> str:
    """One Markdown table: benchmark x normalisation x rule, tune and held-out MRR / recall@k."""
    out = [f"| benchmark | normalize | rule | tune MRR / recall@{k} | held-out MRR / recall@{k} |",
           "| --- | --- | --- | --- | --- |"]
    for name, methods in report.items():
        for method, rules in methods.items():
            for rule, row in rules.items():
                t, h = row["tune"], row["held_out"]
                out.append(f"| {name} | {method} | {rule} | {t['mrr']:.3f} / {t[f'recall@{k}']:.3f} | "
                           f"{h['mrr']:.3f} / {h[f'recall@{k}']:.3f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------ the union of the retrievers (#13)
RETRIEVER_SETS = (("bm25",), ("bm25", "dense"))


def union_rows(inputs: tuple, answers: dict[str, list[str]], mirror: pd.DataFrame, bm25: pd.DataFrame,
               index_dir: Path, k: int = 10) -> dict:
    """Per retriever set: mean candidates per probe, candidate recall (the share of a probe's answers among its
    candidates; with dense, also among the dense top-M alone) and the default hybrid ranking's MRR / recall@k over
    those candidates, on both halves. The candidates are what ``attribute --index`` retrieves
    (``CandidateIndex.retrieve``, M = the default's)."""
    from hf_mirror.config import ScanConfig
    from hf_mirror.probes import Probe
    from hf_mirror.retrieval import build_index

    model, corpus, probes, tokenizer = inputs
    scan = ScanConfig()
    index = build_index(corpus, tokenizer, index_dir, model=model, overwrite=True)
    given = [Probe(p["id"], p["prompt"], p["completion"]) for p in probes]
    split = halves([p for p in dict.fromkeys(mirror["probe_id"]) if p in answers])
    out = {}
    for retrievers in RETRIEVER_SETS:
        embedder = index.embedder(model, tokenizer) if "dense" in retrievers else None
        found = index.retrieve(given, scan.retrieval.n_candidates, embedder)
        chosen = {p: {str(d) for d in docs} for p, docs in found.scores.items()}
        fused = fuse(mirror, bm25, f"hybrid@{scan.retrieval.n_candidates}:{scan.ranking.mirror_weight}", chosen)
        row = {"candidates": float(np.mean([len(chosen[p]) for p in answers]))}
        near = {p: {str(d) for d in docs} for p, docs in (found.dense or {}).items()}
        for half, ids in split.items():
            row[half] = {"candidate_recall": _share(chosen, answers, ids),
                         "dense_recall": _share(near, answers, ids) if near else None,
                         **retrieval_metrics(rankings(fused, ids), answers, k)}
        out["+".join(retrievers)] = row
    return out


def _share(chosen: dict[str, set[str]], answers: dict[str, list[str]], ids: Sequence[str]) -> float:
    """The mean share of each probe's answers among its ``chosen`` documents."""
    return float(np.mean([len(chosen[p] & {str(a) for a in answers[p]}) / len(answers[p]) for p in ids]))


def run_union(cfg: HybridConfig, output_dir: str | Path | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """:func:`union_rows` on every benchmark (the score tables of :func:`run_hybrid`, read back when there)."""
    work = _workdir(output_dir)
    report = {}
    for name, inputs, answers, (mirror, _), (bm25, _) in _benchmarks(cfg, work, log):
        t0 = time.perf_counter()
        rows = union_rows(inputs, answers, mirror, bm25, work / name / "index", cfg.top_k)
        report[name] = {"documents": int(mirror["doc_id"].nunique()), "probes": len(inputs[2]),
                        "seconds": time.perf_counter() - t0, "retrievers": rows}
        log(format_union({name: report[name]}, cfg.top_k))
    report_json = {"config": asdict(cfg), "benchmarks": report}
    (work / "union.json").write_text(json.dumps(report_json, indent=2))
    return report_json


def format_union(benchmarks: dict, k: int = 10) -> str:
    """One Markdown table: benchmark x retriever set, candidate recall and the hybrid's figures per half."""
    out = [f"| benchmark | retrievers | candidates / probe | candidate recall (tune / held-out) | dense top-M alone "
           f"(tune / held-out) | tune MRR | tune recall@{k} | held-out MRR | held-out recall@{k} |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, b in benchmarks.items():
        for retrievers, row in b["retrievers"].items():
            t, h = row["tune"], row["held_out"]
            dense = "" if t["dense_recall"] is None else f"{t['dense_recall']:.3f} / {h['dense_recall']:.3f}"
            out.append(f"| {name} | {retrievers} | {row['candidates']:.1f} | {t['candidate_recall']:.3f} / "
                       f"{h['candidate_recall']:.3f} | {dense} | {t['mrr']:.3f} | {t[f'recall@{k}']:.3f} | "
                       f"{h['mrr']:.3f} | {h[f'recall@{k}']:.3f} |")
    return "\n".join(out)
