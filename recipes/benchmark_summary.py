"""The headline table of docs/benchmarks.md from the benchmarks' JSON reports: every method x every corpus x
(source MRR, tail-patch, LDS, wall time, peak RSS), held-out halves.

    python recipes/benchmark_summary.py runs/summary   # reads the reports below from that folder

Reads, for each corpus C present: ``tail_patch_C.json`` (``recipes/benchmark_tail_patch.py --json``),
``lds_C.json`` (``recipes/benchmark_lds.py --json``) and ``cost_C.json`` (``recipes/benchmark_cost.py --json``);
any of them may be missing. A mirror method's own column (``<spec>[mirror]``) is a row of its own. Prints Markdown.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--half", choices=("held_out", "tune", "all"), default="held_out")
    args = p.parse_args(argv)
    print(summary(args.folder, args.half))
    return 0


if __name__ == "__main__":
    sys.exit(main())
