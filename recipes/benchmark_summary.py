"""The headline table of docs/benchmarks.md from the benchmarks' JSON reports: every method x every corpus x
(source MRR, tail-patch, LDS, wall time, peak RSS), held-out halves.

    python recipes/benchmark_summary.py runs/summary   # reads the reports below from that folder

Reads, for each corpus C present: ``tail_patch_C.json`` (``recipes/benchmark_tail_patch.py --json``),
``lds_C.json`` (``recipes/benchmark_lds.py --json``) and ``cost_C.json`` (``recipes/benchmark_cost.py --json``);
any of them may be missing. A mirror method's own column (``<spec>[mirror]``) is a row of its own. Prints Markdown.

    python recipes/benchmark_summary.py docs/results --frontier docs/frontier.png

also draws the quality-cost frontier: per corpus, each method's held-out tail-patch shares and LDS against its
seconds in the same benchmark run, the methods that no other beats on both joined by a line (issue #25, item 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CORPORA = ("capitals", "wordnet", "docstrings")


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summary(folder: Path, half: str = "held_out") -> str:
    rows: dict[str, dict[str, str]] = {}
    corpora = [c for c in CORPORA if any((folder / f"{k}_{c}.json").exists() for k in ("tail_patch", "lds"))]
    for corpus in corpora:
        tail = _load(folder / f"tail_patch_{corpus}.json").get("methods", {})
        lds = _load(folder / f"lds_{corpus}.json").get("methods", {})
        cost = _load(folder / f"cost_{corpus}.json").get("methods", {})
        for spec in dict.fromkeys([*tail, *lds]):
            cells = rows.setdefault(spec, {})
            variants = tail.get(spec, {}).get("variants", {})
            mrr = tail.get(spec, {}).get("source_mrr", {}).get(half)
            cells[f"{corpus} mrr"] = "" if mrr is None else f"{mrr:.3f}"
            for v in ("sgd", "adam"):
                x = variants.get(v, {}).get(half)
                cells[f"{corpus} {v}"] = "" if x is None else f"{x['top_k_share']:.3f} / {x['spearman']:.3f}"
            row = lds.get(spec)
            cells[f"{corpus} lds"] = "" if row is None else f"{row.get(half, row['lds']):.3f}"
            c = cost.get(spec.split("[")[0])  # the run's cost, for the influence and the [mirror] column alike
            cells[f"{corpus} cost"] = "" if c is None else f"{c['seconds']:.0f} s, {c['peak_rss_mb']:.0f} MB" + (
                f" ({c['seconds_factors_cached']:.0f} s factors cached)" if "seconds_factors_cached" in c else "")
    header = ["method"] + [f"{c}: source MRR | {c}: tail-patch SGD share / Spearman | {c}: tail-patch Adam | "
                           f"{c}: LDS | {c}: wall, peak RSS" for c in corpora]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " --- | --- | --- | --- | --- |" * len(corpora)]
    for spec, cells in rows.items():
        if spec.endswith("[mirror]") and cells == {**rows.get(spec[: -len("[mirror]")], {}),
                                                    **{k: v for k, v in cells.items() if k.endswith("cost")}}:
            continue  # the mirror's own column ranks as the influence column does (lexical weight 0)
        values = [cells.get(f"{c} {k}", "") for c in corpora for k in ("mrr", "sgd", "adam", "lds", "cost")]
        name = spec.replace("|", "\\|")  # a list in a spec (all-linear|lm_head) inside a Markdown cell
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


MEASURES = (("tail_patch", "sgd", "tail-patch top-10 share, 1 SGD step"),
            ("tail_patch", "adam", "tail-patch top-10 share, 3 Adam steps"), ("lds", None, "LDS"))


def frontier_points(folder: Path, half: str = "held_out") -> dict[tuple[str, str], list[tuple[str, float, float]]]:
    """(corpus, measure label) -> [(method, seconds, value)]: each method's cost in the benchmark run that measured
    it and its value on ``half``; the mirror's own column (``[mirror]``) is left out (it ranks as its row does)."""
    out = {}
    for corpus in CORPORA:
        for kind, variant, label in MEASURES:
            methods = _load(folder / f"{kind}_{corpus}.json").get("methods", {})
            points = []
            for spec, row in methods.items():
                if spec.endswith("[mirror]"):
                    continue
                value = row["variants"][variant][half]["top_k_share"] if variant else row.get(half, row["lds"])
                points.append((spec, float(row["seconds"]), float(value)))
            if points:
                out[(corpus, label)] = points
    return out


def pareto(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points that no other point beats on both cost (lower) and value (higher), by cost."""
    kept = [p for p in points if not any((q[1] <= p[1] and q[2] > p[2]) or (q[1] < p[1] and q[2] >= p[2])
                                         for q in points)]
    return sorted(kept, key=lambda p: p[1])


def plot_frontier(folder: Path, path: Path, half: str = "held_out") -> Path:
    """:func:`frontier_points` drawn as one panel per corpus and measure (seconds on a log axis), saved at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = frontier_points(folder, half)
    if not panels:
        raise SystemExit(f"no tail_patch_*.json or lds_*.json reports in {folder}")
    corpora = list(dict.fromkeys(c for c, _ in panels))
    fig, axes = plt.subplots(len(MEASURES), len(corpora), figsize=(5.2 * len(corpora), 3.8 * len(MEASURES)),
                             squeeze=False)
    for j, corpus in enumerate(corpora):
        for i, (_, _, label) in enumerate(MEASURES):
            ax = axes[i][j]
            points = panels.get((corpus, label), [])
            for name, x, y in points:
                ax.scatter(x, y, color="tab:red" if name.startswith("mirror") else "tab:blue", zorder=3)
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto(points)
            ax.plot([p[1] for p in front], [p[2] for p in front], color="gray", lw=1, zorder=2)
            ax.set_xscale("log")
            ax.set_title(f"{corpus}: {label}", fontsize=9)
            ax.set_xlabel("seconds in the benchmark run (log)", fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Quality against cost, {half.replace('_', '-')} probes (gray: the frontier)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--half", choices=("held_out", "tune", "all"), default="held_out")
    p.add_argument("--frontier", type=Path, default=None, help="also draw the quality-cost frontier to this PNG")
    args = p.parse_args(argv)
    print(summary(args.folder, args.half))
    if args.frontier is not None:
        print(f"\nfrontier: {plot_frontier(args.folder, args.frontier, args.half)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
