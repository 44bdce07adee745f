"""``report.html``, the page every attribution run writes beside its result: self-contained (inline CSS, no script,
nothing fetched), one section per probe with its two lists side by side.

- **States it**: the documents ranked by ``score`` (the default: BM25 of prompt + generation over the probe's
  candidates), with the words they share with the probe marked: what BM25 matched.
- **Moved the model**: the documents ranked by the mirror's score alone, with each token shaded by how its loss moved
  under the mirror: where the support sits.

Each list says what orders it; the run's regime warnings (:mod:`hf_mirror.regime`) stand above the probes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from hf_mirror.fusion import Ranking
from hf_mirror.html import CSS, token_color
from hf_mirror.render import _RAW, candidates_phrase
from hf_mirror.results import AttributionResult

REPORT = "report.html"
LIST_K = 5  # documents per list
WORD = re.compile(r"\w+")  # BM25's terms (hf_mirror.baselines.bm25.words): runs of letters, digits, underscores

REPORT_CSS = """
.hfm .lists { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.hfm .list { border: 1px solid #eef1f4; border-radius: 6px; padding: 6px 8px; min-width: 0; }
.hfm .list h3 { font-size: 14px; margin: 0 0 2px 0; }
.hfm .order { color: #59636e; font-size: 12px; margin-bottom: 6px; }
.hfm .item { border-top: 1px solid #eef1f4; padding: 5px 0; }
.hfm .item .head { font-size: 12px; color: #3d444d; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
  monospace; word-break: break-all; }
.hfm .item .text { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; word-break: break-word; margin-top: 2px; }
.hfm mark { background: #fde68a; border-radius: 2px; padding: 0 1px; }
.hfm .warn { border: 1px solid #d4a72c; background: #fff8c5; border-radius: 6px; padding: 6px 10px; margin: 6px 0;
  font-size: 13px; }
.hfm .missing { color: #59636e; font-style: italic; }
.hfm .item.source { background: #fbf7ff; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def marked_terms(text: str, terms: set[str]) -> str:
    """``text`` escaped, with every word BM25 would match against ``terms`` (lowercase) in ``<mark>``."""
    out, last = [], 0
    for m in WORD.finditer(text):
        if m.group(0).lower() in terms:
            out.append(_esc(text[last : m.start()]))
            out.append(f"<mark>{_esc(m.group(0))}</mark>")
            last = m.end()
    out.append(_esc(text[last:]))
    return "".join(out)


def shaded_tokens(ev: pd.DataFrame, scale: float) -> str:
    """A document's tokens (rows of ``token_deltas``), each shaded by its loss delta, its losses in the tooltip."""
    return "".join(
        f'<span style="background:{token_color(d, scale)}" '
        f'title="{_esc(f"delta {d:+.4g} | base loss {b:.3f} | mirror loss {m:.3f}")}">{_esc(t)}</span>'
        for t, d, b, m in zip(ev["token"], ev["delta"], ev["base_loss"], ev["mirror_loss"], strict=True)
    )


def _evidence(result: AttributionResult, probe_id: str, doc_id) -> pd.DataFrame | None:
    ev = result.evidence
    if ev.empty:
        return None
    rows = ev[(ev["probe_id"] == probe_id) & (ev["doc_id"].astype(str) == str(doc_id))]
    return rows.sort_values("position") if len(rows) else None


def _text(result: AttributionResult, doc_id, texts: Mapping[str, str]) -> str | None:
    """A document's text: from the top-k table (any probe's), its evidence tokens, or ``texts``."""
    top = result.topk[result.topk["doc_id"].astype(str) == str(doc_id)]
    if len(top):
        return str(top["text"].iloc[0])
    if not result.evidence.empty:
        ev = result.evidence[result.evidence["doc_id"].astype(str) == str(doc_id)]
        if len(ev):
            first = ev["probe_id"].iloc[0]
            return "".join(ev[ev["probe_id"] == first].sort_values("position")["token"])
    return texts.get(str(doc_id))


def _fmt(value, spec: str) -> str | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if v != v else format(v, spec)


def _mirror_meaning(config: Mapping) -> str:
    scan, mirror = config.get("scan", {}), config.get("mirror", {})
    raw = _RAW.get(scan.get("aggregate", "mean"), _RAW["mean"])
    verb = "learns" if mirror.get("direction") == "learn" else "unlearns"
    normalize = scan.get("normalize", "none")
    how = {"zscore": ", standardised across the run's probes", "loo": ", against the other probes' scores"}.get(
        normalize, "")
    return f"the {raw} when the mirror {verb} the generation{how}; positive = supports it"


def _over(config: Mapping) -> str:
    n = config.get("candidate_documents")
    return (f"over the {n} documents scanned (the probes' candidates)" if isinstance(n, int)
            else "over every scanned document")


def states_list(result: AttributionResult, probe_id: str, k: int = LIST_K) -> tuple[pd.DataFrame, str]:
    """The "states it" list: documents and the sentence that says what orders them (empty without BM25)."""
    scan = result.config.get("scan", {})
    method = result.config.get("method", "mirror")
    if method != "mirror":
        return pd.DataFrame(), ""
    ranking = Ranking.from_settings(scan)
    if ranking.hybrid:
        top = result.top(probe_id).head(k)
        order = (f"{ranking.describe(candidates_phrase(result.config)).order}; marked: the words the document shares "
                 "with the probe (what BM25 matched)")
        return top, order
    path = result.directory / "scores.parquet"
    if not path.exists() or "bm25" not in pq.read_schema(path).names:
        return pd.DataFrame(), ""
    rows = pd.read_parquet(path, filters=[("probe_id", "==", probe_id)]).dropna(subset=["bm25"])
    if rows.empty:
        return pd.DataFrame(), ""
    rows = rows.assign(_neg=-rows["bm25"]).sort_values(["_neg", "doc_id"], kind="stable").head(k)
    return (rows.drop(columns="_neg").reset_index(drop=True),
            f"ordered by bm25 (prompt + generation as the query) {_over(result.config)}; marked: the words the "
            "document shares with the probe")


def moved_list(result: AttributionResult, probe_id: str, k: int = LIST_K) -> tuple[pd.DataFrame, str]:
    """The "moved the model" list: documents and the sentence that says what orders them."""
    scan = result.config.get("scan", {})
    method = result.config.get("method", "mirror")
    if method != "mirror":
        top = result.top(probe_id).head(k)
        return top, f"ordered by the {method} method's score (this run's ranking)"
    if Ranking.from_settings(scan).hybrid:
        rows = result.moved(probe_id, k)
    else:
        rows = result.top(probe_id).head(k).assign(mirror=lambda t: t["score"])
    return rows, (f"ordered by mirror: {_mirror_meaning(result.config)}, {_over(result.config)}; shaded: each token's "
                  "loss change under the mirror (green: supports the generation, red: against)")


def _item(rank: int, head: str, body: str, source: bool = False) -> str:
    tag = '<span class="tag">source</span>' if source else ""
    return (f'<div class="item{" source" if source else ""}"><div class="head">{rank}. {head}{tag}</div>'
            f'<div class="text">{body}</div></div>')


def _states_html(result: AttributionResult, probe_id: str, terms: set[str], k: int, texts: Mapping[str, str],
                 source: object = None) -> str:
    rows, order = states_list(result, probe_id, k)
    if not order:
        return ""
    hybrid = Ranking.from_settings(result.config.get("scan")).hybrid  # else the score is the mirror's: not shown
    items = []
    for i, row in enumerate(rows.itertuples(), 1):
        parts = [f'doc <span class="id">{_esc(row.doc_id)}</span>']
        for name, spec in (("bm25", ".2f"), ("score", "+.3f"), ("mirror", "+.4g")):
            value = _fmt(getattr(row, name, None), spec)
            if value is not None and not (name == "score" and not hybrid):
                parts.append(f"{name} {value}")
        text = _text(result, row.doc_id, texts)
        body = marked_terms(text, terms) if text is not None else '<span class="missing">(text not kept)</span>'
        items.append(_item(i, " &middot; ".join(parts), body, source is not None and str(row.doc_id) == str(source)))
    empty = '<div class="missing">no candidate shares a word with the probe</div>' if not items else ""
    return (f'<div class="list states"><h3>States it</h3><div class="order">{_esc(order)}</div>{"".join(items)}'
            f"{empty}</div>")


def _moved_html(result: AttributionResult, probe_id: str, k: int, texts: Mapping[str, str],
                source: object = None) -> str:
    rows, order = moved_list(result, probe_id, k)
    evs = [_evidence(result, probe_id, d) for d in rows["doc_id"]] if len(rows) else []
    scale = max((float(ev["delta"].abs().max()) for ev in evs if ev is not None), default=0.0)
    items = []
    for i, (row, ev) in enumerate(zip(rows.itertuples(), evs, strict=True), 1):
        parts = [f'doc <span class="id">{_esc(row.doc_id)}</span>']
        for name, spec in (("mirror", "+.4g"), ("raw_score", "+.4g"), ("influence", "+.3g"), ("bm25", ".2f")):
            value = _fmt(getattr(row, name, None), spec)
            if value is not None and not (name == "raw_score" and result.config.get("scan", {}).get(
                    "normalize", "none") == "none"):
                parts.append(f"{'raw' if name == 'raw_score' else name} {value}")
        if ev is not None:
            body = shaded_tokens(ev, scale)
        else:
            text = _text(result, row.doc_id, texts)
            body = _esc(text) if text is not None else '<span class="missing">(text not kept)</span>'
        items.append(_item(i, " &middot; ".join(parts), body, source is not None and str(row.doc_id) == str(source)))
    title = "Moved the model" if result.config.get("method", "mirror") == "mirror" else "Ranked"
    return f'<div class="list moved"><h3>{title}</h3><div class="order">{_esc(order)}</div>{"".join(items)}</div>'


def probe_section(result: AttributionResult, probe_id: str, k: int = LIST_K, texts: Mapping[str, str] | None = None,
                  source: object = None) -> str:
    """One probe: its generation, then "states it" beside "moved the model" (``source``: a document id to tag)."""
    from hf_mirror.retrieval.bm25 import words

    probe_id = result._check_probe(probe_id)
    record = next(r for r in result.probe_records if str(r["id"]) == probe_id)
    before, after = record.get("probe_loss_before"), record.get("probe_loss_after")
    loss = (f" &middot; probe loss {before:.3f} &rarr; {after:.3f} under the mirror"
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "")
    terms = set(words(record["prompt"] + (record.get("completion") or "")))
    lists = (_states_html(result, probe_id, terms, k, texts or {}, source)
             + _moved_html(result, probe_id, k, texts or {}, source))
    return (f'<div class="probe" id="probe-{_esc(probe_id)}"><div class="probe-head"><span class="pid">probe '
            f'{_esc(probe_id)}</span><span class="note">{loss}</span><div class="gen"><span class="prompt">'
            f'{_esc(record["prompt"])}</span><span class="completion">{_esc(record.get("completion") or "")}</span>'
            f'</div></div><div class="lists">{lists}</div></div>')


def report_html(result: AttributionResult, title: str = "hf-mirror attribution", preamble: str = "",
                k: int = LIST_K, texts: Mapping[str, str] | None = None, sources: Mapping[str, object] | None = None
                ) -> str:
    """The whole page (``preamble``: extra, already escaped HTML above the probes; ``sources``: probe id -> the id of
    its known source document, tagged in both lists; ``texts``: document texts the result does not hold)."""
    s, cfg = result.summary(), result.config
    meta = (f"{s['probes']} probe(s) &middot; {s['documents']} documents scanned &middot; {s['skipped']} skipped"
            f" &middot; model {_esc(cfg.get('model', '?'))} &middot; method {_esc(cfg.get('method', 'mirror'))}")
    warnings = "".join(f'<div class="warn">&#9888; {_esc(w)}</div>' for w in cfg.get("regime", {}).get("warnings", []))
    body = "".join(probe_section(result, pid, k, texts, (sources or {}).get(pid)) for pid in result.probe_ids)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(title)}</title></head><body style=\"margin:20px;background:#fff\">"
            f'<div class="hfm"><style>{CSS}{REPORT_CSS}</style><h2>{_esc(title)}</h2>{preamble}'
            f'<div class="meta">{meta}</div>{warnings}{body}</div></body></html>\n')


def write_report(result: AttributionResult, directory: str | Path | None = None, **kwargs) -> Path:
    """Write ``report.html`` into ``directory`` (default: the result's own), atomically."""
    from hf_mirror.integrity import atomic_write

    path = Path(directory if directory is not None else result.directory) / REPORT
    atomic_write(path, report_html(result, **kwargs).encode("utf-8"))
    return path


def missing_texts(result: AttributionResult, k: int = LIST_K) -> set[str]:
    """The ids of the documents either list shows whose text the result does not hold."""
    known = {str(d) for d in result.topk["doc_id"]}
    if not result.evidence.empty:
        known |= {str(d) for d in result.evidence["doc_id"]}
    wanted = set()
    for pid in result.probe_ids:
        for rows in (states_list(result, pid, k)[0], moved_list(result, pid, k)[0]):
            if len(rows):
                wanted |= {str(d) for d in rows["doc_id"]}
    return wanted - known


def moved_without_evidence(result: AttributionResult, k: int = LIST_K) -> dict[str, list]:
    """Per probe, the documents of its "moved the model" list that have no token evidence yet."""
    if result.config.get("method", "mirror") != "mirror" or not Ranking.from_settings(result.config.get("scan")).hybrid:
        return {}
    have = set() if result.evidence.empty else set(zip(result.evidence["probe_id"],
                                                       result.evidence["doc_id"].astype(str), strict=True))
    out = {}
    for pid in result.probe_ids:
        docs = [d for d in result.moved(pid, k)["doc_id"] if (pid, str(d)) not in have]
        if docs:
            out[pid] = docs
    return out


