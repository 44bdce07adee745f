"""Text rendering of results for the terminal: ranked documents with their strongest tokens marked.

Everything that comes from the user's data (document text, probe text, ids) passes through
:func:`~hf_mirror.terminal.printable`, so only hf-mirror's own colour codes reach the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from hf_mirror.config import AUTO_CANDIDATES
from hf_mirror.fusion import Ranking
from hf_mirror.terminal import printable

if TYPE_CHECKING:  # annotations only: results.py imports the views, not the other way round
    from hf_mirror.results import AttributionResult

BOLD, GREEN, DIM, RESET = "\x1b[1m", "\x1b[42;30m", "\x1b[2m", "\x1b[0m"

_RAW = {
    "mean": "mean change in the document's token loss (nats/token)",
    "sum": "summed change in the document's token loss (nats)",
    "max": "largest change of one of the document's token losses (nats)",
}


def _per_probe(config: Mapping) -> int:
    """BM25 candidates per probe, as the run recorded them (``retrieval.per_probe``, else its ``--candidates``)."""
    per_probe = config.get("retrieval", {}).get("per_probe")
    if isinstance(per_probe, int):
        return per_probe
    candidates = config.get("scan", {}).get("candidates")
    return candidates if isinstance(candidates, int) else AUTO_CANDIDATES


def candidates_phrase(config: Mapping) -> str:
    """A probe's candidates in words, as the run recorded them (``"20 BM25 candidates"``, or with the dense ones)."""
    per_probe = _per_probe(config)
    dense = "dense" in config.get("retrieval", {}).get("retrievers", ["bm25"])
    return f"{per_probe} BM25 and {per_probe} dense candidates" if dense else f"{per_probe} BM25 candidates"


def _normalized(raw: str, normalize: str, name: str) -> str:
    """What ``name`` (``score`` or ``mirror``) means given the run's normalisation, then what ``raw`` means."""
    if normalize == "zscore":
        return (f"{name} = raw standardised across the run's probes for that document (at most sqrt(probes - 1)); "
                f"raw = {raw}")
    if normalize == "loo":
        return (f"{name} = raw compared with the other probes' raw scores for that document (in their standard "
                f"deviations); raw = {raw}")
    return f"{name} (raw) = {raw}"


def score_meaning(config: Mapping) -> str:
    """One sentence on what a result's ``score``, ``mirror``, ``raw`` and ``influence`` mean, from its saved config."""
    scan, mirror = config.get("scan", {}), config.get("mirror", {})
    raw = _RAW.get(scan.get("aggregate", "mean"), _RAW["mean"])
    verb = "learns" if mirror.get("direction") == "learn" else "unlearns"
    raw = f"{raw} when the model {verb} the generation" + (" (sign flipped)" if verb == "learns" else "")
    normalize = scan.get("normalize", "none")
    ranking = Ranking.from_settings(scan)
    if ranking.hybrid:
        dense = "dense" in config.get("retrieval", {}).get("retrievers", ["bm25"])
        meaning = ranking.describe(candidates_phrase(config))
        return (f"{meaning.score}; {_normalized(raw, normalize, ranking.mirror_column)} (mirror: documents that moved "
                "the model); "
                + ("dense = cosine similarity of the model's mean-pooled embeddings of probe and document (shown for "
                   "dense candidates); " if dense else "")
                + f"{meaning.influence}; positive = the document supports the generation.")
    return f"{_normalized(raw, normalize, ranking.mirror_column)}; positive = the document supports the generation."


def mark_tokens(tokens: list[str], deltas: np.ndarray, n_marked: int = 5, color: bool = False) -> str:
    """The document text with its ``n_marked`` highest-delta tokens marked (``[[...]]`` or colour).

    Whitespace-only tokens are never marked (they would show as empty markers); control characters are escaped.
    """
    deltas = np.asarray(deltas, dtype=float)
    visible = np.array([bool(t.strip()) for t in tokens], dtype=bool)
    order = np.argsort(-np.where(visible, deltas, -np.inf), kind="stable") if len(deltas) else np.array([], int)
    strongest = {int(i) for i in order[:n_marked] if visible[i] and deltas[i] > 0}
    out = []
    for i, tok in enumerate(tokens):
        tok = printable(tok)
        if i not in strongest:
            out.append(tok)
            continue
        lead = tok[: len(tok) - len(tok.lstrip())]
        core = tok[len(lead) :]
        out.append(f"{lead}{GREEN}{core}{RESET}" if color else f"{lead}[[{core}]]")
    return "".join(out)


def format_probe(result: AttributionResult, probe_id: str, k: int = 5, n_marked: int = 5, color: bool = False) -> str:
    """One probe's generation and its top-``k`` documents, strongest tokens marked."""
    probe = next(p for p in result.probes if p.id == str(probe_id))
    b, r = (BOLD, RESET) if color else ("", "")
    lines = [f"{b}probe {printable(probe.id, False)}{r}: {probe.prompt!r} -> {probe.completion!r}"]
    normalized = result.config.get("scan", {}).get("normalize", "none") != "none"  # else raw == mirror
    for row in result.top(probe.id, min(k, len(result.top(probe.id)))).itertuples():
        if result.has_token_evidence:
            ev = result.token_deltas(probe.id, row.doc_id)
            text = mark_tokens(ev["token"].tolist(), ev["delta"].to_numpy(), n_marked, color)
        else:
            text = printable(row.text)
        text = text.replace("\n", " ")
        both = f"  bm25 {row.bm25:5.2f}" if "bm25" in row._fields and row.bm25 == row.bm25 else ""
        if "mirror" in row._fields and row.mirror == row.mirror:
            both += f"  mirror {row.mirror:+.4f}"  # the mirror's score (normalised as the run says), as labelled
        if normalized and "raw_score" in row._fields and row.raw_score == row.raw_score:
            both += f"  raw {row.raw_score:+.4f}"
        if "dense" in row._fields and row.dense == row.dense:
            both += f"  dense {row.dense:.3f}"
        if "influence" in row._fields and row.influence == row.influence:
            both += f"  influence {row.influence:+.2f}"
        lines.append(f"  {row.rank:>3}. doc {printable(row.doc_id, False)}  score {row.score:+.4f}{both}  {text}")
    if Ranking.from_settings(result.config.get("scan")).hybrid:
        moved = result.moved(probe.id, 3)
        lines.append("       moved the model most (by mirror, every scanned document): " + ", ".join(
            f"doc {printable(d, False)} (mirror {v:+.4f})"
            for d, v in zip(moved["doc_id"], moved["mirror"], strict=True)))
    return "\n".join(lines)


def format_result(
    result: AttributionResult, probe_id: str | None = None, k: int = 5, n_marked: int = 5, color: bool = False
) -> str:
    """Every probe (or only ``probe_id``) with its top-``k`` documents, under a legend of what the marks mean."""
    ids = [str(probe_id)] if probe_id is not None else result.probe_ids
    for pid in ids:
        result._check_probe(pid)
    legend = (f"{score_meaning(result.config)}\nmarked: the tokens whose loss moved most in the probe's favour.")
    warnings = "".join(f"\n{BOLD if color else ''}warning:{RESET if color else ''} {w}"
                       for w in result.config.get("regime", {}).get("warnings", []))
    body = "\n\n".join(format_probe(result, pid, k, n_marked, color) for pid in ids)
    skipped = f"\n\n{len(result.skipped)} document(s) skipped (see skipped.jsonl)" if result.skipped else ""
    return f"{DIM if color else ''}{legend}{RESET if color else ''}{warnings}\n\n{body}{skipped}"
