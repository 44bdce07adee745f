"""Benchmark leakage audit: which evaluation items appear in the training corpus, with evidence.

Three detectors, each with its own evidence:

- ``ngram``: verbatim n-gram overlap with the corpus (the GPT-3 contamination study used 13-grams). Score: the
  fraction of the item's tokens covered by n-grams found in the corpus; evidence: the longest copied spans with
  the documents and offsets they come from. Leaked when the fraction reaches ``threshold``.
- ``mirror``: the item is a probe of the mirror pipeline (:mod:`hf_mirror.provenance.mirror_leakage`). Score:
  ``top_z``, how far the item's best document stands above its scores on the rest of the corpus; evidence: that
  document, its score and its margin over the second.
- ``minkprob``: the Min-K% Prob membership score of the item under the model (Shi et al. 2023; higher = more
  likely seen). It names no document.

The **combined** detector: ``ngram`` OR (``mirror`` AND ``minkprob``). The mirror and Min-K% scores have no
absolute scale across models, so each is turned into a robust z-score across the evaluation items (median and
1.4826 x MAD; this assumes that most items are clean, and needs at least ``MIN_ITEMS_TO_CALIBRATE`` items);
their AND is the smaller of the two z-scores: both must stand out. (A Stouffer sum ranked paraphrases a little
better on the injection benchmark, AUROC 0.80 vs 0.67, but let the mirror alone flag clean items whose best
document is an unrelated one: 3% false positives; docs/benchmarks_details.md, "Benchmark leakage".) The single score is
``combined = max(combined_threshold * coverage / threshold, min(z_mirror, z_minkprob))``, so that ``combined >=
combined_threshold`` is exactly the verdict (n-gram coverage at its threshold counts as a hit).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.provenance.membership import min_k_scores
from hf_mirror.provenance.mirror_leakage import DEFAULT_MIRROR_THRESHOLD, EvalItem, make_items, mirror_leakage
from hf_mirror.retrieval.ngram import NgramIndex

DETECTORS = ("ngram", "mirror", "minkprob")
# robust-z units; on the injection benchmark clean items reach 0.36 (docs/benchmarks_details.md, "Benchmark leakage")
DEFAULT_COMBINED_THRESHOLD = 2.0
MIN_ITEMS_TO_CALIBRATE = 8
_MAD_TO_STD = 1.4826


@dataclass
class EvalSet:
    """Evaluation items: a ``text_column``, or ``question_column`` + ``answer_column`` joined by a space."""

    source: object
    _: KW_ONLY
    text_column: str | None = "text"
    question_column: str | None = None
    answer_column: str | None = None
    id_column: str | None = None
    split: str = "test"

    def items(self) -> list[tuple[object, str]]:
        """``(id, text)`` per item (question and answer joined by a space)."""
        return [(r.id, r.text) for r in self.records()]

    def records(self) -> list[EvalItem]:
        """Each item with its probe split: question -> prompt, answer -> completion (text: see ``split_item``)."""
        columns = [c for c in (self.question_column, self.answer_column) if c] or [self.text_column]
        corpus = Corpus(self.source, text_column=columns[0], id_column=self.id_column, split=self.split)
        out = []
        for index, row in enumerate(corpus.stream()):
            missing = [c for c in [*columns, self.id_column] if c and c not in row]
            if missing:
                raise InputError(
                    f"Evaluation set has no field(s) {missing}; fields present: {sorted(row)}. Pass the right ones "
                    "with --eval-text-column, or --question-column and --answer-column (and --eval-id-column)."
                )
            parts = [row[c] for c in columns]
            if not all(isinstance(p, str) for p in parts):
                item = row[self.id_column] if self.id_column else index
                raise InputError(f"Evaluation item {item!r} has a non-string field among {columns}.")
            item_id = row[self.id_column] if self.id_column else index
            out.append((item_id, *parts))
        if not out:
            raise InputError("The evaluation set is empty.")
        return make_items(out)


@dataclass(kw_only=True)
class ItemVerdict:
    id: object
    text: str
    leaked: bool
    score: float  # the verdict detector's score (n-gram coverage unless the mirror runs: then the combined score)
    longest_span_tokens: int
    min_k_prob: float | None
    evidence: list[dict] = field(default_factory=list)  # n-gram spans
    scores: dict = field(default_factory=dict)  # per detector: ngram, mirror, minkprob, combined (when they ran)
    mirror: dict | None = None  # the mirror's evidence: top document, its score, top_z and margin, top documents


def robust_z(values: Sequence[float]) -> np.ndarray:
    """(x - median) / (1.4826 MAD) across the items; NaN where too few finite values to calibrate."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < MIN_ITEMS_TO_CALIBRATE:
        return np.full(len(x), np.nan)
    med = np.median(x[ok])
    scale = _MAD_TO_STD * np.median(np.abs(x[ok] - med))
    if scale <= 0:
        scale = x[ok].std() or 1.0
    return (x - med) / scale


def combined_scores(coverage: Sequence[float] | None, mirror_top_z: Sequence[float] | None,
                    min_k: Sequence[float] | None, threshold: float = 0.5,
                    combined_threshold: float = DEFAULT_COMBINED_THRESHOLD) -> np.ndarray:
    """The combined detector's score per item (see the module docstring); any detector may be left out (None)."""
    sizes = {len(v) for v in (coverage, mirror_top_z, min_k) if v is not None}
    if len(sizes) != 1:
        raise InputError("Pass at least one detector's scores, all for the same items.")
    n = sizes.pop()
    parts = [robust_z(v) for v in (mirror_top_z, min_k) if v is not None]
    if parts:
        stacked = np.vstack(parts)
        soft_and = np.where(np.isfinite(stacked).all(0), np.min(stacked, axis=0), -np.inf)
    else:
        soft_and = np.full(n, -np.inf)
    hits = (combined_threshold * np.asarray(coverage, dtype=np.float64) / threshold if coverage is not None
            else np.full(n, -np.inf))
    return np.maximum(hits, soft_and)


def audit_leakage(
    index: NgramIndex | None,
    items: Sequence,
    threshold: float = 0.5,
    model=None,
    tokenizer=None,
    k: float = 20.0,
    max_evidence: int = 3,
    *,
    detectors: Sequence[str] | None = None,
    corpus: Corpus | None = None,
    mirror=None,
    scan=None,
    mirror_threshold: float = DEFAULT_MIRROR_THRESHOLD,
    combined_threshold: float = DEFAULT_COMBINED_THRESHOLD,
    output_dir: str | Path | None = None,
    show_progress: bool = False,
    membership: str = "mink",
) -> dict:
    """Per item: verdict, score, per-detector scores and evidence; overall: the contamination rate.

    ``items``: ``(id, text)`` pairs, ``EvalItem`` s (``EvalSet.records()``) or dicts. ``detectors`` (default:
    ``ngram``, plus ``minkprob`` when a model is given) picks what runs. The verdict is the n-gram one unless
    the mirror runs: then it is the combined detector's (see the module docstring); with ``minkprob`` alone,
    the Min-K% robust z-score against ``combined_threshold``. ``mirror`` needs ``model`` and ``corpus``; its
    attribution run is kept under ``output_dir`` when given. ``mirror``/``scan`` configure that run.
    ``membership`` picks the ``minkprob`` detector's score: ``"mink"`` (Min-K% Prob) or ``"mink++"`` (Min-K%++).
    """
    if not 0 < threshold <= 1:
        raise InputError(f"threshold is a fraction of the item's tokens in (0, 1], got {threshold}.")
    detectors = _detectors(detectors, index, model, corpus)
    records = make_items(items)
    texts = [r.text for r in records]
    member_scores = np.full(len(records), np.nan)
    if "minkprob" in detectors:
        if tokenizer is None:
            from hf_mirror.modeling import resolve_model

            model, tokenizer, _ = resolve_model(model)
        member_scores = min_k_scores(model, tokenizer, texts, k=k, method=membership)
    mirrored = None
    if "mirror" in detectors:
        mirrored = mirror_leakage(model, corpus, records, tokenizer=tokenizer, mirror=mirror, scan=scan,
                                  threshold=mirror_threshold, output_dir=output_dir, show_progress=show_progress,
                                  overwrite=True)
    signals = _Signals(matches=[index.find(t) for t in texts] if "ngram" in detectors else None, mirrored=mirrored,
                       records=records, min_k=member_scores if "minkprob" in detectors else None,
                       verdict_by="combined" if "mirror" in detectors or detectors == ("minkprob",) else "ngram",
                       threshold=threshold, combined_threshold=combined_threshold, max_evidence=max_evidence)
    verdicts = [signals.verdict(i, rec, mk) for i, (rec, mk) in enumerate(zip(records, member_scores, strict=True))]
    leaked = sum(v.leaked for v in verdicts)
    detector = {"method": signals.verdict_by, "detectors": list(detectors), "threshold": threshold,
                "min_k_percent": k, "membership": membership, "combined_threshold": combined_threshold,
                "mirror_threshold": mirror_threshold, "n": index.n if index is not None else None}
    return {"contamination_rate": leaked / len(verdicts), "leaked": leaked, "items": [asdict(v) for v in verdicts],
            "detector": detector}


def _detectors(detectors: Sequence[str] | None, index, model, corpus) -> tuple[str, ...]:
    """The detectors to run (default: ``ngram``, and ``minkprob`` given a model), refused without what they need."""
    if detectors is None:
        detectors = ("ngram", "minkprob") if model is not None else ("ngram",)
    detectors = tuple(dict.fromkeys(detectors))
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        raise InputError(f"Unknown detector(s) {unknown}; choose among {list(DETECTORS)}.")
    if "ngram" in detectors and index is None:
        raise InputError("The ngram detector needs an n-gram index (NgramIndex.build).")
    if ("mirror" in detectors or "minkprob" in detectors) and model is None:
        raise InputError("The mirror and minkprob detectors need the model.")
    if "mirror" in detectors and corpus is None:
        raise InputError("The mirror detector needs the corpus to scan.")
    return detectors


class _Signals:
    """Every detector's output over the items, and how one item's verdict is made from them."""

    def __init__(self, *, matches: list | None, mirrored: dict | None, records: Sequence[EvalItem],
                 min_k: np.ndarray | None, verdict_by: str, threshold: float, combined_threshold: float,
                 max_evidence: int) -> None:
        self.matches, self.mirrored, self.min_k, self.verdict_by = matches, mirrored, min_k, verdict_by
        self.threshold, self.combined_threshold, self.max_evidence = threshold, combined_threshold, max_evidence
        self.coverage = np.array([m.coverage for m in matches]) if matches is not None else None
        self.top_z = np.array([mirrored[r.id].top_z for r in records]) if mirrored is not None else None
        self.combined = None
        if verdict_by == "combined" or min_k is not None:
            self.combined = combined_scores(self.coverage, self.top_z if verdict_by == "combined" else None, min_k,
                                            threshold, combined_threshold)
        self.z_mirror = robust_z(self.top_z) if self.top_z is not None else None
        self.z_mink = robust_z(min_k) if min_k is not None else None

    def verdict(self, i: int, rec: EvalItem, mk: float) -> ItemVerdict:
        evidence, longest, scores, mirror_ev = [], 0, {}, None
        if self.matches is not None:
            match = self.matches[i]
            spans = sorted(match.spans, key=lambda s: -(s.end - s.start))[: self.max_evidence]
            evidence = [{"text": s.text, "query_tokens": [s.start, s.end],
                         "documents": [{"doc_id": o.doc_id, "offset": o.offset} for o in s.occurrences[:5]]}
                        for s in spans]
            longest = match.longest
            scores["ngram"] = float(match.coverage)
        if self.mirrored is not None:
            ev = self.mirrored[rec.id]
            scores["mirror"], scores["mirror_z"] = _num(ev.top_z), _num(self.z_mirror[i])
            top = ev.top[0] if ev.top else {}
            mirror_ev = {"doc_id": top.get("doc_id"), "score": top.get("score"), "top_z": _num(ev.top_z),
                         "margin": _num(ev.margin), "leaked": ev.leaked, "top": ev.top,
                         "prompt": rec.prompt, "completion": rec.completion}
        if self.min_k is not None:
            scores["minkprob"], scores["minkprob_z"] = _num(mk), _num(self.z_mink[i])
        if self.combined is not None:
            scores["combined"] = _num(self.combined[i])
        if self.verdict_by == "ngram":
            score, leaked = float(self.coverage[i]), bool(self.coverage[i] >= self.threshold)
        else:
            score = float(self.combined[i]) if np.isfinite(self.combined[i]) else float("nan")
            leaked = bool(np.isfinite(self.combined[i]) and self.combined[i] >= self.combined_threshold)
        return ItemVerdict(id=rec.id, text=rec.text, leaked=leaked, score=score, longest_span_tokens=longest,
                           min_k_prob=_num(mk), evidence=evidence, scores=scores, mirror=mirror_ev)


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def write_report(report: dict, directory: str | Path) -> Path:
    """``report.json`` and a self-contained ``report.html`` in ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    d = report["detector"]
    ran = d.get("detectors", ["ngram", "minkprob"])
    columns = [c for c in ("ngram", "mirror", "minkprob", "combined")
               if any(c in item.get("scores", {}) for item in report["items"])]
    if not columns and "ngram" in ran:  # a report written before per-detector scores
        columns = ["ngram"]
    rows = []
    for item in report["items"]:
        ev = "<br>".join(
            f"<q>{html.escape(e['text'])}</q> in "
            + ", ".join(f"{html.escape(str(doc['doc_id']))}@{doc['offset']}" for doc in e["documents"])
            for e in item["evidence"]
        )
        m = item.get("mirror")
        if m and m.get("doc_id") is not None:
            ev += ("<br>" if ev else "") + (
                f"mirror: top document <b>{html.escape(str(m['doc_id']))}</b> (score {_fmt(m['score'])}, "
                f"top z {_fmt(m['top_z'])}, margin {_fmt(m['margin'])} over the next)")
        scores = item.get("scores", {})
        if not scores:
            scores = {"ngram": item["score"], "minkprob": item.get("min_k_prob")}
        cells = "".join(f"<td>{_fmt(scores.get(c))}</td>" for c in columns)
        rows.append(
            f"<tr class={'leak' if item['leaked'] else 'ok'}><td>{html.escape(str(item['id']))}</td>"
            f"<td>{'LEAKED' if item['leaked'] else 'clean'}</td>{cells}"
            f"<td>{html.escape(item['text'])}</td><td>{ev}</td></tr>"
        )
    rules = []
    if "ngram" in ran and d.get("n") is not None:
        rules.append(f"n-gram: the share of the item's tokens in {d['n']}-grams found verbatim in the corpus "
                     f"(threshold {d['threshold']:.0%})")
    if "mirror" in ran:
        rules.append("mirror: top z, how far the item's best document stands above its scores on the rest of the "
                     "corpus when the mirror unlearns the item")
    if "minkprob" in ran:
        name = "Min-K%++" if d.get("membership") == "mink++" else "Min-K% Prob"
        rules.append(f"{name} (k={d['min_k_percent']:g}): higher means more likely seen in training")
    if "combined" in columns:
        rules.append(f"combined: n-gram OR (mirror AND Min-K%), in robust z units across the items, threshold "
                     f"{d.get('combined_threshold', DEFAULT_COMBINED_THRESHOLD):g}")
    verdict = "the combined detector" if d["method"] == "combined" else "the n-gram detector"
    page = (
        "<!doctype html><meta charset=utf-8><title>hf-mirror leakage audit</title><style>"
        "body{font:14px sans-serif;margin:20px}td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top;"
        "text-align:left}tr.leak td:nth-child(2){color:#b00;font-weight:bold}q{background:#fde2e2}</style>"
        f"<h1>Leakage audit</h1><p>{report['leaked']} of {len(report['items'])} items leaked "
        f"(contamination rate {report['contamination_rate']:.1%}); verdicts by {verdict}.</p><ul>"
        + "".join(f"<li>{html.escape(r)}</li>" for r in rules) + "</ul>"
        "<table><tr><th>id</th><th>verdict</th>" + "".join(f"<th>{c}</th>" for c in columns)
        + "<th>item</th><th>evidence</th></tr>" + "".join(rows) + "</table>"
    )
    (out / "report.html").write_text(page)
    return out
