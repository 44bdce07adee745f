"""Self-contained HTML view of an AttributionResult: generations, ranked documents, tokens shaded by delta.

No JavaScript and no external resources: the markup carries its own CSS, so it renders the same in Jupyter,
in a saved ``report.html`` and offline.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hf_mirror.fusion import Ranking
from hf_mirror.render import score_meaning

if TYPE_CHECKING:  # annotations only: results.py imports the views, not the other way round
    from hf_mirror.results import AttributionResult

# diverging colours: green = the token supports the probe, red = it works against it
SUPPORT_RGB = (22, 163, 74)
AGAINST_RGB = (220, 38, 38)
MAX_ALPHA = 0.85

CSS = """
.hfm { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; font-size: 14px; color: #1f2328;
  line-height: 1.45; max-width: 1100px; }
.hfm h2 { font-size: 18px; margin: 0 0 6px 0; }
.hfm .meta { color: #59636e; font-size: 12px; margin-bottom: 10px; }
.hfm .legend { display: flex; align-items: center; gap: 10px; flex-wrap: wrap; font-size: 12px; color: #3d444d;
  border: 1px solid #d1d9e0; border-radius: 6px; padding: 6px 10px; margin: 8px 0 14px 0; background: #f6f8fa; }
.hfm .ramp { display: inline-block; width: 180px; height: 12px; border-radius: 3px; border: 1px solid #d1d9e0;
  background: linear-gradient(to right, rgba(220,38,38,0.85), rgba(220,38,38,0) 50%, rgba(22,163,74,0) 50%,
  rgba(22,163,74,0.85)); }
.hfm .probe { border: 1px solid #d1d9e0; border-radius: 8px; padding: 10px 12px; margin: 0 0 16px 0; }
.hfm .probe-head { margin-bottom: 8px; }
.hfm .pid { font-weight: 600; color: #0969da; margin-right: 6px; }
.hfm .gen { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; background: #f6f8fa; border-radius: 4px; padding: 4px 6px; margin-top: 4px; }
.hfm .prompt { font-weight: 700; }
.hfm .completion { color: #0550ae; }
.hfm table { border-collapse: collapse; width: 100%; }
.hfm td { border-top: 1px solid #eef1f4; padding: 5px 6px; vertical-align: top; text-align: left; }
.hfm th { font-size: 12px; color: #59636e; font-weight: 600; text-align: left; padding: 2px 6px; }
.hfm td.rank { width: 28px; color: #59636e; }
.hfm td.doc { width: 170px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; word-break: break-all; }
.hfm td.score { width: 150px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; }
.hfm .bar { height: 8px; border-radius: 2px; margin-top: 3px; }
.hfm .bar.pos { background: #16a34a; }
.hfm .bar.neg { background: #dc2626; }
.hfm .tokens { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; word-break: break-word; }
.hfm .tokens span { border-radius: 2px; }
.hfm .tag { display: inline-block; font-size: 11px; font-weight: 600; color: #fff; background: #8250df;
  border-radius: 10px; padding: 0 6px; margin-left: 4px; }
.hfm tr.source td { background: #fbf7ff; }
.hfm .note { color: #59636e; font-size: 12px; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def token_color(delta: float, scale: float) -> str:
    """CSS background for a token: green for positive deltas, red for negative, opacity by |delta| / scale."""
    if scale <= 0 or delta == 0 or delta != delta:  # zero scale, no change, or NaN
        return "transparent"
    t = max(-1.0, min(1.0, delta / scale))
    r, g, b = SUPPORT_RGB if t > 0 else AGAINST_RGB
    return f"rgba({r},{g},{b},{abs(t) * MAX_ALPHA:.3f})"


def legend_html(config: Mapping | None = None) -> str:
    """The colour ramp and one sentence on what the scores of a result with ``config`` mean."""
    return (
        '<div class="legend"><span>token loss delta:</span>'
        '<span>&minus; against the generation</span><span class="ramp"></span>'
        "<span>+ supports the generation</span>"
        f'<span class="note"><b>{_esc(score_meaning(config or {}))}</b> Green: under the mirror (fitted to unlearn '
        "the generation) the token's loss moved in the probe's favour, i.e. the document supports the generation; "
        "red: it moved the other way. Shading is scaled per probe; hover a token for its losses.</span>"
        "</div>"
    )


def _tokens_html(ev, scale: float) -> str:
    """A document's tokens, each shaded by its delta (``ev``: rows of ``token_deltas``)."""
    return "".join(
        f'<span style="background:{token_color(d, scale)}" '
        f'title="{_esc(f"delta {d:+.4f} | base loss {b:.3f} | mirror loss {m:.3f}")}">{_esc(tok)}</span>'
        for tok, d, b, m in zip(ev["token"], ev["delta"], ev["base_loss"], ev["mirror_loss"], strict=True)
    )


def probe_html(result: AttributionResult, probe_id: str, k: int = 5, source: object | None = None) -> str:
    """One probe: prompt + generation, its top-``k`` documents with score bars and delta-shaded tokens.

    ``source``, when given, is the id of the document the probe is known to come from; its row is tagged.
    """
    probe_id = result._check_probe(probe_id)
    record = next(r for r in result.probe_records if str(r["id"]) == probe_id)
    top = result.top(probe_id)
    top = top.head(k) if k is not None else top
    evs = [result.token_deltas(probe_id, d) if result.has_token_evidence else None for d in top["doc_id"]]
    scale = max((float(ev["delta"].abs().max()) for ev in evs if ev is not None and len(ev)), default=0.0)
    max_score = max((abs(float(s)) for s in top["score"]), default=0.0) or 1.0
    normalized = result.config.get("scan", {}).get("normalize", "none") != "none"  # else score == raw
    hybrid = Ranking.from_settings(result.config.get("scan")).hybrid and "bm25" in top
    before, after = record.get("probe_loss_before"), record.get("probe_loss_after")
    loss = (
        f" &middot; probe loss {before:.3f} &rarr; {after:.3f} under the mirror"
        if isinstance(before, (int, float)) and isinstance(after, (int, float))
        else ""
    )
    rows = []
    for row, ev in zip(top.itertuples(), evs, strict=True):
        is_source = source is not None and str(row.doc_id) == str(source)
        width = 100.0 * abs(float(row.score)) / max_score
        tag = '<span class="tag">source</span>' if is_source else ""
        score = f"{float(row.score):+.3f}" if normalized else f"{float(row.score):+.4f}"
        raw = f'<div class="note">raw {float(row.raw_score):+.4f}</div>' if normalized else ""
        if hybrid:
            bm25 = "not a candidate" if row.bm25 != row.bm25 else f"{float(row.bm25):.2f}"
            influence = (f" &middot; influence {float(row.influence):+.2f}"
                         if "influence" in top and row.influence == row.influence else "")
            dense = (f" &middot; dense {float(row.dense):.3f}" if "dense" in top and row.dense == row.dense else "")
            mirror = (f" &middot; mirror {float(row.mirror):+.4f}" if "mirror" in top and row.mirror == row.mirror
                      else "")
            before = f" &middot; raw {float(row.raw_score):+.4f}" if normalized else ""
            raw = f'<div class="note">bm25 {bm25}{dense}{mirror}{before}{influence}</div>'
        rows.append(
            f'<tr class="{"source" if is_source else ""}"><td class="rank">{int(row.rank)}</td>'
            f'<td class="doc">{_esc(row.doc_id)}{tag}</td>'
            f'<td class="score">{score}'
            f'<div class="bar {"pos" if row.score >= 0 else "neg"}" style="width:{width:.1f}%"></div>{raw}</td>'
            f'<td class="tokens">{_tokens_html(ev, scale) if ev is not None else _esc(row.text)}</td></tr>'
        )
    return (
        f'<div class="probe"><div class="probe-head"><span class="pid">probe {_esc(probe_id)}</span>'
        f'<span class="note">top {len(top)} documents{loss}</span>'
        f'<div class="gen"><span class="prompt">{_esc(record["prompt"])}</span>'
        f'<span class="completion">{_esc(record.get("completion") or "")}</span></div></div>'
        "<table><tr><th>#</th><th>document</th><th>score</th><th>text, shaded by token loss delta</th></tr>"
        f"{''.join(rows)}</table>{_moved_html(result, probe_id) if hybrid else ''}</div>"
    )


def _moved_html(result: AttributionResult, probe_id: str, k: int = 5) -> str:
    """The documents that moved the model most (by the mirror's score alone, every scanned document)."""
    moved = result.moved(probe_id, k)
    items = ", ".join(f"{_esc(d)} (mirror {float(v):+.4f})"
                      for d, v in zip(moved["doc_id"], moved["mirror"], strict=True))
    return (f'<div class="note">documents that moved the model most (by the mirror\'s score alone, over every scanned '
            f"document): {items}</div>")


def render_html(
    result: AttributionResult,
    probe_id: str | None = None,
    k: int = 5,
    sources: Mapping[str, object] | None = None,
    title: str | None = None,
) -> str:
    """An HTML fragment (inline CSS, no scripts) showing every probe, or only ``probe_id``.

    ``sources`` maps probe ids to the id of their known source document, which is then tagged.
    """
    ids = [result._check_probe(probe_id)] if probe_id is not None else result.probe_ids
    s = result.summary()
    cfg = result.config
    meta = (
        f"{s['probes']} probe(s) &middot; {s['documents']} documents scanned &middot; {s['skipped']} skipped"
        f" &middot; model {_esc(cfg.get('model', '?'))}"
        f" &middot; normalize {_esc(cfg.get('scan', {}).get('normalize', '?'))}"
    )
    head = f"<h2>{_esc(title)}</h2>" if title else ""
    body = "".join(probe_html(result, pid, k, (sources or {}).get(pid)) for pid in ids)
    return f'<div class="hfm"><style>{CSS}</style>{head}<div class="meta">{meta}</div>{legend_html(cfg)}{body}</div>'


def write_html(
    result: AttributionResult,
    path: str | Path,
    k: int = 5,
    sources: Mapping[str, object] | None = None,
    title: str = "hf-mirror attribution",
    preamble: str = "",
) -> Path:
    """Write a standalone HTML page; ``preamble`` is extra (already escaped) HTML put above the probes."""
    path = Path(path)
    fragment = render_html(result, k=k, sources=sources)
    head = f'<h1 style="font-family:Helvetica,Arial,sans-serif;font-size:20px;color:#1f2328">{_esc(title)}</h1>'
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title></head>"
        f'<body style="margin:20px;background:#fff">{head}{preamble}{fragment}</body></html>\n'
    )
    path.write_text(page, encoding="utf-8")
    return path
