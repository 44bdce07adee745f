"""Text rendering of results for the terminal: ranked documents with their strongest tokens marked."""

from __future__ import annotations

import numpy as np

from hf_mirror.results import AttributionResult

BOLD, GREEN, DIM, RESET = "\x1b[1m", "\x1b[42;30m", "\x1b[2m", "\x1b[0m"


def mark_tokens(tokens: list[str], deltas: np.ndarray, n_marked: int = 5, color: bool = False) -> str:
    """The document text with its ``n_marked`` highest-delta tokens marked (``[[...]]`` or colour)."""
    strongest = set(np.argsort(-deltas, kind="stable")[:n_marked].tolist()) if len(deltas) else set()
    out = []
    for i, tok in enumerate(tokens):
        if i not in strongest or deltas[i] <= 0:
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
    lines = [f"{b}probe {probe.id}{r}: {probe.prompt!r} -> {probe.completion!r}"]
    for row in result.top(probe.id, min(k, len(result.top(probe.id)))).itertuples():
        if result.has_token_evidence:
            ev = result.token_deltas(probe.id, row.doc_id)
            text = mark_tokens(ev["token"].tolist(), ev["delta"].to_numpy(), n_marked, color)
        else:
            text = row.text
        text = text.replace("\n", " ")
        lines.append(f"  {row.rank:>3}. doc {row.doc_id}  score {row.score:+.4f}  {text}")
    return "\n".join(lines)


def format_result(
    result: AttributionResult, probe_id: str | None = None, k: int = 5, n_marked: int = 5, color: bool = False
) -> str:
    ids = [str(probe_id)] if probe_id is not None else result.probe_ids
    for pid in ids:
        result._check_probe(pid)
    legend = (
        "marked: the tokens whose loss moved most in the probe's favour; score > 0 = the document "
        "supports the generation"
    )
    body = "\n\n".join(format_probe(result, pid, k, n_marked, color) for pid in ids)
    skipped = f"\n\n{len(result.skipped)} document(s) skipped (see skipped.jsonl)" if result.skipped else ""
    return f"{DIM if color else ''}{legend}{RESET if color else ''}\n\n{body}{skipped}"
