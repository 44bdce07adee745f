"""Terminal rendering: control characters from the data are shown escaped, whitespace tokens are never marked."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from hf_mirror.cli import main
from hf_mirror.render import BOLD, DIM, GREEN, RESET, format_result, mark_tokens, score_meaning
from hf_mirror.results import AttributionResult
from hf_mirror.terminal import EscapeControl, printable

EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e\r"  # title, clear screen, C1 CSI, bidi override, carriage return


def _strip_ours(text: str) -> str:
    for code in (BOLD, GREEN, DIM, RESET):
        text = text.replace(code, "")
    return text


def _result(tmp_path, evidence: bool = True, normalize: str = "none") -> AttributionResult:
    pid, doc = f"p{EVIL}", f"d{EVIL}"
    tokens = ["of", " ", "K", "est", f" {EVIL}x", "\n", "."]
    deltas = [0.1, 0.9, 0.5, 0.4, 0.3, 0.8, 0.2]
    ev = pd.DataFrame({"probe_id": pid, "doc_id": doc, "position": range(len(tokens)), "token": tokens,
                       "base_loss": 1.0, "mirror_loss": [1.0 + d for d in deltas], "delta": deltas})
    topk = pd.DataFrame({"probe_id": [pid], "rank": [1], "doc_id": [doc], "score": [0.4], "raw_score": [0.4],
                         "n_tokens": [len(tokens)], "text": ["".join(tokens)]})
    probes = [{"id": pid, "prompt": f"q{EVIL}:", "completion": f" a{EVIL}"}]
    config = {"model": "m", "scan": {"top_k": 1, "normalize": normalize, "aggregate": "mean"},
              "mirror": {"direction": "unlearn"}, "stats": {"documents": 1}}
    return AttributionResult(tmp_path, topk=topk, evidence=ev if evidence else ev.iloc[:0], probes=probes, skipped=[],
                             config=config)


def test_printable_escapes_control_characters():
    assert printable("a\x1bb") == "a\\x1bb"
    assert printable(EVIL) == "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e\\x0d"
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"
    assert printable("tab\tand\nnewline", newlines=False) == "tab\\tand\\nnewline"
    assert printable("plain Ünïcode 漢字") == "plain Ünïcode 漢字"
    assert printable(12) == "12"


def test_mark_tokens_skips_whitespace_tokens():
    tokens, deltas = ["of", " ", "K", "est", "\n", "."], np.array([0.1, 0.9, 0.5, 0.4, 0.8, 0.3])
    assert mark_tokens(tokens, deltas, n_marked=3) == "of [[K]][[est]]\n[[.]]"  # no empty [[]] markers
    assert "[[]]" not in mark_tokens(tokens, deltas, n_marked=6)
    assert mark_tokens([" ", "\t"], np.array([1.0, 2.0])) == " \t"
    assert mark_tokens(["a", "b"], np.array([-1.0, 0.0])) == "ab", "only positive deltas are marked"
    assert mark_tokens([], np.array([])) == ""


def test_mark_tokens_escapes_but_keeps_own_colour():
    out = mark_tokens([f"{EVIL}red", " ok"], np.array([0.5, 0.1]), n_marked=1, color=True)
    assert out.count("\x1b") == 2 and out.startswith(GREEN) and RESET in out
    assert "\x1b" not in _strip_ours(out) and "\\x1b]0;pwned" in out
    assert "\x1b" not in mark_tokens([f"{EVIL}red"], np.array([0.5]))


@pytest.mark.parametrize("evidence", [True, False])
@pytest.mark.parametrize("color", [True, False])
def test_format_result_never_writes_control_characters(tmp_path, evidence, color):
    out = format_result(_result(tmp_path, evidence), color=color)
    clean = _strip_ours(out)
    assert not any(ch in clean for ch in "\x1b\x07\x9b\u202e\r"), repr(clean)
    assert "\\x1b]0;pwned" in clean and "[[]]" not in clean
    if color:
        assert GREEN in out if evidence else BOLD in out
    else:
        assert "\x1b" not in out


def test_legend_says_what_the_score_means(tmp_path):
    out = format_result(_result(tmp_path), color=False)
    assert out.startswith("score (raw) = mean change in the document's token loss (nats/token) when the model "
                          "unlearns the generation; positive = the document supports the generation.")
    z = score_meaning({"scan": {"normalize": "zscore"}})
    assert "standardised across the run's probes" in z and "raw = mean change" in z
    assert "other probes" in score_meaning({"scan": {"normalize": "loo"}})
    assert "summed change" in score_meaning({"scan": {"aggregate": "sum"}})
    assert "learns the generation (sign flipped)" in score_meaning({"mirror": {"direction": "learn"}})


def test_show_cli_escapes(tmp_path, capsys):
    result = _result(tmp_path / "src")
    result.save(tmp_path / "run")
    assert main(["show", str(tmp_path / "run"), "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in _strip_ours(out) and GREEN in out and "\\x1b[2J" in out


def test_log_filter_escapes_messages():
    record = logging.LogRecord("hf_mirror.x", logging.WARNING, __file__, 1, "document %s failed", (EVIL,), None)
    assert EscapeControl().filter(record)
    assert "\x1b" not in record.getMessage() and "\\x1b]0;pwned" in record.getMessage()


def _hybrid(tmp_path, normalize: str = "zscore", **scan) -> AttributionResult:
    """A hybrid run whose normalised mirror (``mirror``) and raw score (``raw_score``) disagree in value and order."""
    scores = pd.DataFrame({"probe_id": "p", "doc_id": ["a", "b", "c"], "score": [1.0, 2 / 3, np.nan],
                           "raw_score": [0.9, 0.4447, 0.1], "n_tokens": 3, "bm25": [3.0, 2.0, np.nan],
                           "influence": [0.31, 1.62, -0.61], "mirror": [0.5, 2.6438, -1.0]})
    scores.to_parquet(tmp_path / "scores.parquet")
    topk = scores.iloc[:2].assign(rank=[1, 2], text=["alpha text", "beta text"])
    config = {"model": "m", "scan": {"top_k": 2, "normalize": normalize, "aggregate": "mean", "rank_by": "hybrid",
                                     **scan},
              "mirror": {"direction": "unlearn"}, "stats": {"documents": 3},
              "retrieval": {"retrievers": ["bm25"], "per_probe": scan.get("candidates", 20)}}
    probes = [{"id": "p", "prompt": "q", "completion": " a"}]
    return AttributionResult(tmp_path, topk=topk, evidence=pd.DataFrame(), probes=probes, skipped=[], config=config)


def test_terminal_prints_what_its_labels_say(tmp_path):
    out = format_result(_hybrid(tmp_path, mirror_weight=0.0, lexical_weight=0.0), color=False)
    row = next(line for line in out.splitlines() if "doc b" in line and "score" in line)
    assert "mirror +2.6438" in row and "raw +0.4447" in row, row  # mirror is the normalised score, raw beside it
    assert "mirror +0.4447" not in out and "raw = mirror" not in out
    assert "mirror = raw standardised across the run's probes" in out and "raw = mean change" in out
    moved = next(line for line in out.splitlines() if "moved the model most" in line)
    assert moved.index("doc b") < moved.index("doc a") and "(mirror +2.6438)" in moved  # ordered by mirror, shown
    plain = format_result(_hybrid(tmp_path, normalize="none", mirror_weight=0.0, lexical_weight=0.0), color=False)
    assert "raw +" not in plain and "mirror (raw) = mean change" in plain  # no normalisation: mirror is raw


def test_legend_reads_the_weights_and_candidates_from_the_run(tmp_path):
    legend = score_meaning(_hybrid(tmp_path, mirror_weight=0.3, lexical_weight=0.7, candidates=7).config)
    assert "7 BM25 candidates" in legend and "+ 0.3 x the mirror's score" in legend
    assert "influence = mirror / sd + 0.7 x BM25 / sd" in legend
    assert "20" not in legend and "0.05" not in legend and "0.5 x" not in legend
    defaults = score_meaning(_hybrid(tmp_path, mirror_weight=0.0, lexical_weight=0.0).config)
    assert "20 BM25 candidates; " in defaults and "x the mirror's score" not in defaults  # BM25's order
    assert "influence = mirror / sd over the probe's scored documents" in defaults and "no BM25 prior" in defaults
    unknown = score_meaning(_hybrid(tmp_path).config)  # a run that did not record its weights: no guessed number
    assert "not recorded" in unknown and "0.05" not in unknown and "0.5 x" not in unknown


def test_html_heading_and_values_agree(tmp_path):
    from hf_mirror.html import probe_html

    html = probe_html(_hybrid(tmp_path, mirror_weight=0.0, lexical_weight=0.0), "p")
    moved = html[html.index("moved the model most"):]
    assert "influence alone" not in html and "by the mirror&#x27;s score alone" in moved.replace("'", "&#x27;")
    assert moved.index("b (mirror +2.6438)") < moved.index("a (mirror +0.5000)")
    assert "mirror +2.6438 &middot; raw +0.4447" in html and "mirror +0.4447" not in html
