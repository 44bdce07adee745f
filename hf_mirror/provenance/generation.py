"""Per-generation provenance: "this generation was memorized from document X" (or, for a completion the user
gave, "it overlaps document X verbatim"), with the evidence.

For each probe (prompt + generation; a probe without a completion gets the model's greedy one) two independent
checks meet:

- the **n-gram index** finds the generation's verbatim spans in the corpus. The *source* is the document that
  covers the most generated tokens with its spans; when that document alone covers at least ``threshold`` of
  them, the model's own generation is **memorized**, and a given completion has **verbatim overlap** with it (a
  text the user supplied shows nothing about what the model memorized). Each copied span comes with its token
  range in the generation, its character range, and the token offset in the source document;
- the **mirror** (:func:`hf_mirror.attribute`) ranks every document by how much unlearning the generation
  raises its loss: the report gives the source document's rank and score there, and the mirror's own top
  documents (for a generation with no verbatim source, the mirror's top document is the best guess).

A generation shorter than the index's n-gram length cannot contain one of its n-grams: an infini-gram index
checks it with n lowered to its length (the whole generation verbatim); a hashed n-gram index cannot, so the
generation gets the verdict ``"too short to check"`` and a warning instead of a silent "not memorized".
"""

from __future__ import annotations

import html
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.retrieval.ngram import NGRAM, NgramIndex

logger = logging.getLogger(__name__)
TOO_SHORT = "too short to check"
# the verdict when one document holds ``threshold`` of the text's tokens verbatim, and when none does: "memorized"
# only for the model's own (greedy) generation, "verbatim overlap" for a completion the user gave
VERDICTS = {True: ("memorized", "not memorized"), False: ("verbatim overlap", "no verbatim overlap")}


def _char_ranges(tokenizer, text: str, spans) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping")
    out = []
    for s in spans:
        if offsets and s.end <= len(offsets):
            out.append((int(offsets[s.start][0]), int(offsets[s.end - 1][1])))
        else:
            i = text.find(s.text)
            out.append((i, i + len(s.text)) if i >= 0 else (-1, -1))
    return out


def _find(index, text: str) -> tuple[object, int, str | None]:
    """``(match, n used, note)``: n lowered to a short generation's length when the index answers any n."""
    match = index.find(text)
    if not 0 < match.n_tokens < index.n:
        return match, index.n, None
    short = f"{match.n_tokens} tokens, fewer than the n-gram length {index.n}"
    if "n" in inspect.signature(index.find).parameters:  # infini-gram: a suffix array answers any n
        return index.find(text, n=match.n_tokens), match.n_tokens, f"{short}: checked with n={match.n_tokens}"
    return match, index.n, f"{short}: a verbatim copy cannot be found (rebuild the index with a smaller --ngram)"


def generation_provenance(
    model,
    corpus,
    probes,
    *,
    tokenizer=None,
    index: NgramIndex | None = None,
    n: int = NGRAM,
    threshold: float = 0.5,
    use_mirror: bool = True,
    mirror=None,
    scan=None,
    max_new_tokens: int = 32,
    output_dir: str | Path | None = None,
    top: int = 5,
    show_progress: bool = False,
) -> dict:
    """Per generation: verdict, source document, copied spans with offsets, and the mirror's view of the source.

    ``probes``: a JSON-lines path or a list of ``{id, prompt, completion?}``. ``index``: a prebuilt
    ``NgramIndex`` of ``corpus`` for this tokenizer (built with ``n`` when not given). The mirror run (skipped
    with ``use_mirror=False``) is kept in ``output_dir/attribution`` when ``output_dir`` is given.
    """
    from hf_mirror.modeling import resolve_model
    from hf_mirror.probes import generate_completions, load_probes

    if not 0 < threshold <= 1:
        raise InputError(f"threshold is a fraction of the generation's tokens in (0, 1], got {threshold}.")
    model, tokenizer, _ = resolve_model(model, tokenizer)
    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus)
    given = load_probes(probes)
    generated = {p.id for p in given if p.completion is None}  # the model's own generations
    probe_list = generate_completions(model, tokenizer, given, max_new_tokens)
    if index is None:
        index = NgramIndex.build(corpus, tokenizer, n=n, show_progress=show_progress)
    rankings = (_mirror_rankings(model, tokenizer, corpus, probe_list, mirror, scan, top, output_dir, show_progress)
                if use_mirror else None)
    reports = []
    for p in probe_list:
        entry = _copied(index, tokenizer, p, threshold, p.id in generated)
        if rankings is not None:
            entry["mirror"] = _mirror_view(rankings.get(p.id, {}), entry["source"], top)
            entry["mirror_agrees"] = entry["source"] is not None and entry["mirror"]["source_rank"] == 1
        reports.append(entry)
    counts = {verdict: sum(r["verdict"] == verdict for r in reports) for verdict in ("memorized", "verbatim overlap")}
    return {**counts, "generations": len(reports), "model_generations": len(generated), "threshold": threshold,
            "n": index.n, "too_short": sum(r["verdict"] == TOO_SHORT for r in reports), "mirror": use_mirror,
            "items": reports}


def summary(report: dict) -> str:
    """One line: how many of the model's own generations were memorized, how many given completions overlap."""
    items = report["items"]
    own = [r for r in items if r.get("generated", True)]
    parts = [f"{sum(r['verdict'] == 'memorized' for r in own)} of the model's {len(own)} generations memorized"
             ] if own else []
    if len(own) < len(items):
        parts.append(f"{sum(r['verdict'] == 'verbatim overlap' for r in items)} of {len(items) - len(own)} given "
                     "completions overlap one document verbatim")
    return "; ".join(parts)


def _mirror_rankings(model, tokenizer, corpus: Corpus, probe_list, mirror, scan, top: int,
                     output_dir: str | Path | None, show_progress: bool) -> dict[str, dict]:
    """Per probe, every scanned document's mirror score, best first (the mirror's own score under the hybrid)."""
    from hf_mirror.config import RankingConfig
    from hf_mirror.pipeline import ScanConfig, attribute

    result = attribute(model, corpus, probe_list, tokenizer=tokenizer, mirror=mirror,
                       scan=scan or ScanConfig(ranking=RankingConfig(top_k=top)),
                       output_dir=None if output_dir is None else Path(output_dir) / "attribution",
                       show_progress=show_progress, overwrite=True)
    scores = result.scores()
    column = "mirror" if "mirror" in scores else "score"
    out = {}
    for pid, group in scores.groupby("probe_id", sort=False):
        group = group.sort_values(column, ascending=False, kind="mergesort")
        ids = [d.item() if hasattr(d, "item") else d for d in group["doc_id"]]
        out[str(pid)] = dict(zip(ids, group[column].astype(float), strict=True))
    return out


def _copied(index: NgramIndex, tokenizer, p, threshold: float, generated: bool) -> dict:
    """One generation's verbatim verdict: its source document (covering most of its tokens) and copied spans;
    ``generated``: the model's own generation (memorized or not), else a given completion (verbatim overlap)."""
    text = p.completion or ""
    match, n_used, note = _find(index, text)
    per_doc: dict[object, set[int]] = {}
    for span in match.spans:
        for occ in span.occurrences:
            per_doc.setdefault(occ.doc_id, set()).update(range(span.start, span.end))
    source, copied = None, 0
    if per_doc:  # the document covering most tokens; ties: corpus order of the first occurrence
        source = max(per_doc, key=lambda d: len(per_doc[d]))
        copied = len(per_doc[source])
    fraction = copied / match.n_tokens if match.n_tokens else 0.0
    src_spans = [s for s in match.spans if any(o.doc_id == source for o in s.occurrences)]
    chars = _char_ranges(tokenizer, text, src_spans)
    spans = [{"text": s.text, "tokens": [s.start, s.end], "chars": list(c),
              "source_offset": next(o.offset for o in s.occurrences if o.doc_id == source)}
             for s, c in zip(src_spans, chars, strict=True)]
    found = source is not None and fraction >= threshold
    verdict = VERDICTS[generated][0 if found else 1]
    if not found and n_used > match.n_tokens > 0:
        verdict = TOO_SHORT
    if note:
        logger.warning("Generation %r: %s.", p.id, note)
    return {"id": p.id, "prompt": p.prompt, "generation": text, "generated": generated, "n_tokens": match.n_tokens,
            "n": n_used, "verdict": verdict, "source": source, "copied_tokens": copied, "copied_fraction": fraction,
            "spans": spans, "coverage": match.coverage, **({"note": note} if note else {})}


def _mirror_view(scores: dict, source: object, top: int) -> dict:
    """Where the mirror ranks the verbatim source among every scanned document, and its top documents."""
    order = list(scores)
    return {"source_rank": (order.index(source) + 1) if source in scores else None,
            "source_score": scores.get(source),
            "top": [{"rank": r + 1, "doc_id": d, "score": scores[d]} for r, d in enumerate(order[:top])]}


def write_provenance(report: dict, directory: str | Path) -> Path:
    """``provenance.json`` and a self-contained ``provenance.html`` (copied spans highlighted) in ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "provenance.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    blocks = []
    for r in report["items"]:
        marked, last = [], 0
        for a, b in sorted(tuple(s["chars"]) for s in r["spans"] if s["chars"][0] >= 0):
            if a < last:
                a = last
            marked.append(html.escape(r["generation"][last:a]))
            marked.append(f"<mark>{html.escape(r['generation'][a:b])}</mark>")
            last = max(last, b)
        marked.append(html.escape(r["generation"][last:]))
        found = r["verdict"] in ("memorized", "verbatim overlap")
        head = (f"<b>{html.escape(str(r['id']))}</b>: <span class={'mem' if found else 'ok'}>{r['verdict']}</span>")
        if r["source"] is not None:
            head += (f" {'from' if r['verdict'] == 'memorized' else 'with'} document <b>"
                     f"{html.escape(str(r['source']))}</b> ({r['copied_tokens']} of {r['n_tokens']} tokens verbatim)")
        if r.get("note"):
            head += f"<br><i>{html.escape(r['note'])}</i>"
        m = r.get("mirror") or {}
        parts = []
        if m and r["source"] is not None:
            parts.append("source not scored" if m["source_rank"] is None else f"source at rank {m['source_rank']}")
        if m.get("top"):
            parts.append("top documents " + ", ".join(f"{html.escape(str(t['doc_id']))} ({t['score']:.2f})"
                                                      for t in m["top"][:3]))
        if parts:
            head += "<br>mirror: " + "; ".join(parts)
        blocks.append(f"<div class=gen><p>{head}</p><pre><i>{html.escape(r['prompt'])}</i>{''.join(marked)}</pre>"
                      "</div>")
    page = ("<!doctype html><meta charset=utf-8><title>hf-mirror provenance</title><style>body{font:14px sans-serif;"
            "margin:20px}pre{white-space:pre-wrap;background:#f6f8fa;padding:6px}mark{background:#fde2e2}"
            ".mem{color:#b00;font-weight:bold}</style>"
            f"<h1>Verbatim provenance</h1><p>{html.escape(summary(report))} (a single document holds at least "
            f"{report['threshold']:.0%} of their tokens in {report['n']}-gram spans; highlighted)."
            + (f" {report['too_short']} too short to check." if report.get("too_short") else "")
            + "</p>" + "".join(blocks))
    (out / "provenance.html").write_text(page)
    return out


__all__: Sequence[str] = ["generation_provenance", "summary", "write_provenance"]
