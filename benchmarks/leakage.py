"""Leakage-injection benchmark: do the detectors find evaluation items copied into a training corpus?

Evaluation items are real WordNet entries (the bundled ``wordnet_facts.jsonl``) that the background corpus
(other entries of the same file) does not contain. Some items are injected into the corpus as an exact copy,
a near copy (one small edit: :func:`~hf_mirror.provenance.rewrite.near_copy`) or a paraphrase
(:func:`~hf_mirror.provenance.rewrite.paraphrase`); the rest stay clean. A small GPT-2 is trained on the
corpus, and every detector scores every item. Per injection type and detector: top-1 / top-5 hit rate of the
injected document in the detector's evidence (n/a for Min-K%, which names no document), AUROC of injected vs
clean items, TPR at 1% FPR, and the share of items flagged at the default threshold (``flagged``; for clean
items that is the false-positive rate).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hf_mirror.corpus import Corpus
from hf_mirror.provenance.rewrite import near_copy, paraphrase

KINDS = ("exact", "near", "paraphrase")
DETECTORS = ("ngram", "mirror", "minkprob", "combined")


@dataclass
class LeakageBenchmarkConfig:
    n_background: int = 600
    n_per_kind: int = 20  # injected items per injection type
    n_clean: int = 100  # items never injected
    seed: int = 0
    ngram: int = 8  # WordNet entries are short (~25 tokens): 13-grams would miss most near copies
    vocab_size: int = 2000
    n_layer: int = 2
    n_embd: int = 128
    epochs: int = 30
    batch_size: int = 64  # scan batch
    adapters_per_forward: int = 8
    membership: str = "mink"  # the minkprob detector's score (mink or mink++); both are recorded per item

    @classmethod
    def quick(cls) -> LeakageBenchmarkConfig:
        """A size for tests: well under a minute on one CPU thread."""
        return cls(n_background=60, n_per_kind=3, n_clean=9, vocab_size=500, n_layer=2, n_embd=64, epochs=40)


def build(cfg: LeakageBenchmarkConfig) -> tuple[list[dict], list[dict]]:
    """``(documents, items)``: the corpus (background + injected copies, shuffled) and the labelled items."""
    from hf_mirror.demo import load_facts

    rows = load_facts()
    rng = random.Random(cfg.seed)
    # one entry per headword, so that no clean item has a same-headword twin in the background
    seen, unique = set(), []
    for r in rows:
        if r["headword"] not in seen:
            seen.add(r["headword"])
            unique.append(r)
    rng.shuffle(unique)
    n_items = len(KINDS) * cfg.n_per_kind + cfg.n_clean
    chosen, background = unique[:n_items], unique[n_items : n_items + cfg.n_background]
    docs = [{"id": r["id"], "text": r["text"], "injected_for": None} for r in background]
    items = []
    rewrite = {"exact": lambda t, _: t, "near": near_copy, "paraphrase": paraphrase}
    for i, r in enumerate(chosen):
        kind = KINDS[i // cfg.n_per_kind] if i < len(KINDS) * cfg.n_per_kind else "clean"
        item = {"id": r["id"], "text": r["text"], "prompt": r["prompt"], "completion": r["completion"], "kind": kind,
                "injected_doc": None}
        if kind != "clean":
            doc_id = f"injected-{kind}-{r['id']}"
            docs.append({"id": doc_id, "text": rewrite[kind](r["text"], rng), "injected_for": r["id"]})
            item["injected_doc"] = doc_id
        items.append(item)
    rng.shuffle(docs)
    return docs, items


def _auroc_tpr(pos: list[float], neg: list[float]) -> tuple[float, float]:
    from benchmarks import load_metric

    scores = [-1e30 if not np.isfinite(x) else x for x in [*pos, *neg]]
    labels = [1] * len(pos) + [0] * len(neg)
    auroc = load_metric("auroc").compute(predictions=scores, references=labels)
    tpr = load_metric("tpr_at_fpr").compute(predictions=scores, references=labels, fpr=0.01)
    return float(next(iter(auroc.values()))), float(next(iter(tpr.values())))


def _ngram_ranking(match) -> list:
    """Documents of an item's verbatim spans, by the number of the item's tokens they cover."""
    per_doc: dict[object, set[int]] = {}
    for span in match.spans:
        for occ in span.occurrences:
            per_doc.setdefault(occ.doc_id, set()).update(range(span.start, span.end))
    return sorted(per_doc, key=lambda d: -len(per_doc[d]))


def run_benchmark(cfg: LeakageBenchmarkConfig, output_dir: str | Path | None = None,
                  show_progress: bool = False) -> dict:
    """Build, train, run the four detectors, and return the metrics (see the module docstring)."""
    from hf_mirror.config import CALIBRATED_MIRROR, RankingConfig, ScoringConfig, SpeedConfig, WindowConfig
    from hf_mirror.mirror import MirrorConfig
    from hf_mirror.pipeline import ScanConfig
    from hf_mirror.provenance.leakage import audit_leakage, make_items
    from hf_mirror.provenance.membership import MEMBERSHIP_METHODS, min_k_scores
    from hf_mirror.retrieval.ngram import NgramIndex
    from hf_mirror.tiny_lm import train_tiny_lm

    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_leak_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs, items = build(cfg)
    (work / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (work / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    model, tokenizer = train_tiny_lm([d["text"] for d in docs], work / "model", vocab_size=cfg.vocab_size,
                                     n_layer=cfg.n_layer, n_embd=cfg.n_embd, epochs=cfg.epochs, seed=cfg.seed,
                                     show_progress=show_progress)
    t_train = time.perf_counter() - t0
    corpus = Corpus(str(work / "corpus.jsonl"), id_column="id")
    index = NgramIndex.build(corpus, tokenizer, n=cfg.ngram)
    t1 = time.perf_counter()
    records = [{"id": i["id"], "question": i["prompt"], "answer": i["completion"]} for i in items]
    report = audit_leakage(index, records, model=model, tokenizer=tokenizer,
                           detectors=("ngram", "mirror", "minkprob"), corpus=corpus,
                           mirror=MirrorConfig(**CALIBRATED_MIRROR, seed=cfg.seed),
                           scan=ScanConfig(windows=WindowConfig(batch_size=cfg.batch_size),
                                           scoring=ScoringConfig(normalize="loo"), ranking=RankingConfig(top_k=5),
                                           speed=SpeedConfig(adapters_per_forward=cfg.adapters_per_forward)),
                           output_dir=work / "mirror", show_progress=show_progress, membership=cfg.membership)
    t_detect = time.perf_counter() - t1
    by_id = {r["id"]: r for r in report["items"]}
    texts = [r.text for r in make_items(records)]  # the audit scored cfg.membership; the other one, for comparison
    membership = {m: min_k_scores(model, tokenizer, texts, method=m) for m in MEMBERSHIP_METHODS if m != cfg.membership}
    membership[cfg.membership] = [by_id[i["id"]]["scores"]["minkprob"] for i in items]
    rows = {}
    for n, item in enumerate(items):
        r = by_id[item["id"]]
        ngram_rank = _ngram_ranking(index.find(item["text"]))
        mirror_rank = [t["doc_id"] for t in r["mirror"]["top"]]
        combined_rank = ngram_rank if r["scores"]["ngram"] >= report["detector"]["threshold"] else mirror_rank
        rankings = {"ngram": ngram_rank, "mirror": mirror_rank, "combined": combined_rank}
        rows[item["id"]] = {
            "kind": item["kind"],
            "scores": {"ngram": r["scores"]["ngram"], "mirror": r["scores"].get("mirror"),
                       **{m: float(membership[m][n]) for m in MEMBERSHIP_METHODS}},
            "rank": {d: (rankings[d].index(item["injected_doc"]) + 1 if item["injected_doc"] in rankings[d][:5]
                         else None) for d in rankings},
        }
    out = {"config": asdict(cfg), "documents": len(docs), "items": len(items), "train_seconds": t_train,
           "detect_seconds": t_detect, "per_item": rows}
    out = summarize(out, membership=cfg.membership)
    (work / "benchmark.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


def summarize(result: dict, threshold: float = 0.5, mirror_threshold: float | None = None,
              combined_threshold: float | None = None, membership: str = "mink") -> dict:
    """The table from the per-item detector scores (``result["per_item"]``), with the combined score and the
    verdicts recomputed at the given (default: the library's) thresholds, the ``minkprob`` detector using the
    ``membership`` score (``mink`` or ``mink++``; results saved before both were recorded have Min-K% only).
    Used by ``--rescore``."""
    from hf_mirror.provenance.leakage import DEFAULT_COMBINED_THRESHOLD, combined_scores, robust_z
    from hf_mirror.provenance.mirror_leakage import DEFAULT_MIRROR_THRESHOLD

    mirror_threshold = DEFAULT_MIRROR_THRESHOLD if mirror_threshold is None else mirror_threshold
    combined_threshold = DEFAULT_COMBINED_THRESHOLD if combined_threshold is None else combined_threshold
    ids = list(result["per_item"])
    rows = [result["per_item"][i] for i in ids]
    for r in rows:
        if membership in r["scores"]:
            r["scores"]["minkprob"] = r["scores"][membership]
        elif membership != "mink":
            raise ValueError(f"These results have no {membership!r} scores; rerun the benchmark.")
    raw = {d: np.array([_f(r["scores"][d]) for r in rows]) for d in ("ngram", "mirror", "minkprob")}
    combined = combined_scores(raw["ngram"], raw["mirror"], raw["minkprob"], threshold, combined_threshold)
    z_mink = robust_z(raw["minkprob"])
    for i, r in enumerate(rows):
        r["scores"]["combined"] = float(combined[i])
        r["flagged"] = {"ngram": bool(raw["ngram"][i] >= threshold),
                        "mirror": bool(raw["mirror"][i] >= mirror_threshold),
                        "minkprob": bool(z_mink[i] >= combined_threshold),
                        "combined": bool(combined[i] >= combined_threshold)}
    clean = [r for r in rows if r["kind"] == "clean"]
    table = []
    for kind in (*KINDS, "clean"):
        group = [r for r in rows if r["kind"] == kind]
        for det in DETECTORS:
            entry = {"injection": kind, "detector": det, "items": len(group),
                     "flagged": float(np.mean([r["flagged"][det] for r in group]))}
            if kind != "clean":
                if det == "minkprob":
                    entry["top1"] = entry["top5"] = None
                else:
                    entry["top1"] = float(np.mean([r["rank"][det] == 1 for r in group]))
                    entry["top5"] = float(np.mean([r["rank"][det] is not None for r in group]))
                pos = [_f(r["scores"][det]) for r in group]
                neg = [_f(r["scores"][det]) for r in clean]
                entry["auroc"], entry["tpr_at_1pct_fpr"] = _auroc_tpr(pos, neg)
            table.append(entry)
    result["table"] = table
    result["thresholds"] = {"ngram": threshold, "mirror": mirror_threshold, "combined": combined_threshold}
    result["membership"] = membership
    return result


def _f(x) -> float:
    return float("-inf") if x is None else float(x)


def format_table(result: dict) -> str:
    """The metrics as a Markdown table."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    lines = ["| injection | detector | items | top-1 | top-5 | AUROC | TPR@1%FPR | flagged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["table"]:
        if e["injection"] == "clean":
            lines.append(f"| clean | {e['detector']} | {e['items']} | | | | | {pct(e['flagged'])} (FPR) |")
            continue
        lines.append(f"| {e['injection']} | {e['detector']} | {e['items']} | {pct(e['top1'])} | {pct(e['top5'])} | "
                     f"{e['auroc']:.3f} | {pct(e['tpr_at_1pct_fpr'])} | {pct(e['flagged'])} |")
    return "\n".join(lines)
