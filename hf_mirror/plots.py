"""Matplotlib plots of an AttributionResult (matplotlib is an optional extra, imported inside each function)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_mirror.errors import InputError

if TYPE_CHECKING:  # annotations only: results.py imports the views, not the other way round
    from hf_mirror.results import AttributionResult


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("Plots need matplotlib: pip install 'hf-mirror[notebook]' (or matplotlib).") from e
    return plt


def plot_scores(result: AttributionResult, probe_id: str, k: int = 5, bins: int = 60, label: int = 3):
    """Histogram of one probe's scores over all documents, the top-``k`` marked (the best ``label`` named).

    Returns a ``matplotlib.figure.Figure``.
    """
    probe_id = result._check_probe(probe_id)
    scores = result.scores()
    scores = scores[scores["probe_id"] == probe_id]
    if scores.empty:
        raise InputError(f"No scores for probe {probe_id!r} (scores.parquet is missing or empty).")
    top = result.top(probe_id).head(k)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4), layout="constrained")
    ax.hist(scores["score"], bins=bins, color="#8c959f", log=True)
    ax.set_yscale("log")
    for row in top.itertuples():
        ax.axvline(row.score, color="#16a34a", lw=1.2, alpha=0.9)
    lines = [f"#{r.rank} {r.doc_id}  {r.score:+.3f}" for r in top.head(label).itertuples()]
    ax.text(
        0.01,
        0.97,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        fontsize=8,
        family="monospace",
        color="#166534",
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#d1d9e0"},
    )
    ax.set_xlabel(f"score ({result.config.get('scan', {}).get('normalize', 'raw')})")
    ax.set_ylabel("documents (log)")
    ax.set_title(f"probe {probe_id}: scores of {len(scores)} documents, top {len(top)} in green", fontsize=10)
    plt.close(fig)  # returned, not shown twice by notebook backends
    return fig


def plot_token_deltas(result: AttributionResult, probe_id: str, k: int = 3, max_tokens: int = 64):
    """Per-token loss deltas of a probe's top-``k`` documents, one bar chart per document.

    Bars above zero are tokens whose loss moved in the probe's favour. Returns a ``matplotlib.figure.Figure``.
    """
    probe_id = result._check_probe(probe_id)
    top = result.top(probe_id).head(k)
    if top.empty:
        raise InputError(f"Probe {probe_id!r} has no ranked documents to plot.")
    evs = [result.token_deltas(probe_id, d).head(max_tokens) for d in top["doc_id"]]
    plt = _pyplot()
    width = max(6.0, min(16.0, 0.22 * max(len(ev) for ev in evs) + 2))
    fig, axes = plt.subplots(len(evs), 1, figsize=(width, 2.3 * len(evs)), layout="constrained", squeeze=False)
    lim = max(float(ev["delta"].abs().max()) for ev in evs) * 1.1 or 1.0
    for ax, row, ev in zip(axes[:, 0], top.itertuples(), evs, strict=True):
        d = ev["delta"].to_numpy()
        ax.bar(ev["position"], d, color=["#16a34a" if x >= 0 else "#dc2626" for x in d], width=0.8)
        ax.axhline(0, color="#57606a", lw=0.6)
        ax.set_ylim(-lim, lim)
        ax.set_xticks(ev["position"])
        ax.set_xticklabels([repr(t)[1:-1] for t in ev["token"]], rotation=90, fontsize=7, family="monospace")
        ax.set_xlim(-0.6, len(ev) - 0.4)
        ax.set_ylabel("delta", fontsize=8)
        ax.set_title(f"#{row.rank} doc {row.doc_id} (score {row.score:+.2f})", fontsize=9, loc="left")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"probe {probe_id}: token loss deltas (> 0 supports the generation)", fontsize=10)
    plt.close(fig)
    return fig
