"""Benchmark leakage audit: which evaluation items appear in the training corpus, with evidence.

Each item is checked by verbatim n-gram overlap with the corpus (the GPT-3 contamination study used 13-grams):
its score is the fraction of its tokens covered by n-grams found in the corpus, and the evidence is the longest
copied spans with the documents and offsets they come from. The Min-K% Prob membership score of the item under
the model is reported alongside, as a second signal (it has no calibrated threshold yet).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.provenance.membership import min_k_scores
from hf_mirror.provenance.ngram import NgramIndex


@dataclass
class EvalSet:
    """Evaluation items: a ``text_column``, or ``question_column`` + ``answer_column`` joined by a space."""

    source: object
    text_column: str | None = "text"
    question_column: str | None = None
    answer_column: str | None = None
    id_column: str | None = None
    split: str = "test"

    def items(self) -> list[tuple[object, str]]:
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
            out.append((row[self.id_column] if self.id_column else index, " ".join(parts)))
        if not out:
            raise InputError("The evaluation set is empty.")
        return out


@dataclass
class ItemVerdict:
    id: object
    text: str
    leaked: bool
    score: float  # fraction of the item's tokens inside n-grams found in the corpus
    longest_span_tokens: int
    min_k_prob: float | None
    evidence: list[dict] = field(default_factory=list)


def audit_leakage(
    index: NgramIndex,
    items: list[tuple[object, str]],
    threshold: float = 0.5,
    model=None,
    tokenizer=None,
    k: float = 20.0,
    max_evidence: int = 3,
) -> dict:
    """Per item: verdict (``score >= threshold``), score, evidence; overall: the contamination rate."""
    if not 0 < threshold <= 1:
        raise InputError(f"threshold is a fraction of the item's tokens in (0, 1], got {threshold}.")
    membership = (min_k_scores(model, tokenizer, [t for _, t in items], k=k) if model is not None
                  else np.full(len(items), np.nan))
    verdicts = []
    for (item_id, text), mk in zip(items, membership, strict=True):
        match = index.find(text)
        spans = sorted(match.spans, key=lambda s: -(s.end - s.start))[:max_evidence]
        evidence = [{"text": s.text, "query_tokens": [s.start, s.end],
                     "documents": [{"doc_id": o.doc_id, "offset": o.offset} for o in s.occurrences[:5]]}
                    for s in spans]
        verdicts.append(ItemVerdict(item_id, text, bool(match.coverage >= threshold), float(match.coverage),
                                    max((s.end - s.start for s in match.spans), default=0),
                                    None if np.isnan(mk) else float(mk), evidence))
    leaked = sum(v.leaked for v in verdicts)
    return {"contamination_rate": leaked / len(verdicts), "leaked": leaked, "items": [asdict(v) for v in verdicts],
            "detector": {"method": "ngram", "n": index.n, "threshold": threshold, "min_k_percent": k}}


def write_report(report: dict, directory: str | Path) -> Path:
    """``report.json`` and a self-contained ``report.html`` in ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = []
    for item in report["items"]:
        ev = "<br>".join(
            f"<q>{html.escape(e['text'])}</q> in "
            + ", ".join(f"{html.escape(str(d['doc_id']))}@{d['offset']}" for d in e["documents"])
            for e in item["evidence"]
        )
        mk = "" if item["min_k_prob"] is None else f"{item['min_k_prob']:.2f}"
        rows.append(
            f"<tr class={'leak' if item['leaked'] else 'ok'}><td>{html.escape(str(item['id']))}</td>"
            f"<td>{'LEAKED' if item['leaked'] else 'clean'}</td><td>{item['score']:.2f}</td><td>{mk}</td>"
            f"<td>{html.escape(item['text'])}</td><td>{ev}</td></tr>"
        )
    d = report["detector"]
    page = (
        "<!doctype html><meta charset=utf-8><title>hf-mirror leakage audit</title><style>"
        "body{font:14px sans-serif;margin:20px}td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top;"
        "text-align:left}tr.leak td:nth-child(2){color:#b00;font-weight:bold}q{background:#fde2e2}</style>"
        f"<h1>Leakage audit</h1><p>{report['leaked']} of {len(report['items'])} items leaked "
        f"(contamination rate {report['contamination_rate']:.1%}); an item is leaked when at least "
        f"{d['threshold']:.0%} of its tokens lie in {d['n']}-grams found verbatim in the corpus. Min-K% Prob "
        f"(k={d['min_k_percent']:g}): higher means more likely seen in training.</p>"
        "<table><tr><th>id</th><th>verdict</th><th>overlap</th><th>Min-K%</th><th>item</th><th>evidence</th></tr>"
        + "".join(rows) + "</table>"
    )
    (out / "report.html").write_text(page)
    return out
