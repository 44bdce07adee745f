"""Choose the influence column's lexical weight by LDS: tune halves of both LDS benchmarks, held-out halves reported.

    python recipes/benchmark_lexical_prior.py [--weights 0,0.1,0.2,0.3,0.5,1,2] [--json runs/lexical_prior.json]
                                              [--cache-dir DIR] [--quick]

For the capitals and the WordNet LDS benchmarks (``benchmarks.lds``; retrains cached under ``--cache-dir``), scores
every document with the default mirror and with BM25 once, then computes the LDS of
``hf_mirror.fusion.influence`` (the mirror's scores plus ``weight`` x BM25's, each scaled per probe) for every
weight, on the tune half of the probes (even positions) and the held-out half (odd positions). The chosen weight
maximises the mean tune LDS over both benchmarks among the weights whose tune LDS is at least BM25's on each; the
table reports every weight's held-out figures beside BM25's and the mirror's own. Finally the library's default
(``ScanConfig().ranking.lexical_weight``) is run end to end and its ``influence`` column scored, which must reproduce
the row of that weight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

import numpy as np

from hf_mirror.flags import offline_defaults


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    import tempfile

    import torch

    from benchmarks._common import write_json
    from benchmarks.lds import (
        CORPORA,
        LDSConfig,
        lds_of_matrix,
        lexical_prior_lds,
        load_or_train,
        method_scores,
        score_matrix,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="0,0.1,0.2,0.3,0.5,1,2", help="lexical weights to compare")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full models and retrains are cached")
    p.add_argument("--quick", action="store_true", help="the LDS benchmarks' test sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hf_mirror_prior_"))
    report: dict = {"weights": weights, "corpora": {}}
    for corpus in CORPORA:
        setup, retrains = load_or_train(LDSConfig.for_corpus(corpus, args.quick), cache_dir=args.cache_dir,
                                        log=lambda s: print(s, file=sys.stderr))
        scores = {m: method_scores(m, setup, work / corpus / m) for m in ("mirror", "bm25")}
        raw = scores["mirror"]["mirror" if "mirror" in scores["mirror"] else "score"]
        mirror = score_matrix(scores["mirror"].assign(score=raw), retrains.probe_ids, retrains.doc_ids)
        bm25 = score_matrix(scores["bm25"], retrains.probe_ids, retrains.doc_ids)
        rows = lexical_prior_lds(mirror, bm25, retrains, weights)
        base = {}
        for name, matrix in (("bm25", bm25), ("mirror", mirror)):
            per = np.array([lds_of_matrix(matrix, retrains)["per_probe"][p] for p in retrains.probe_ids])
            base[name] = {"all": float(np.nanmean(per)), "tune": float(np.nanmean(per[0::2])),
                          "held_out": float(np.nanmean(per[1::2])), "per_probe": per.tolist()}
        default = scores["mirror"]
        column = "influence" if "influence" in default else "score"
        run = lds_of_matrix(score_matrix(default, retrains.probe_ids, retrains.doc_ids, column), retrains)
        report["corpora"][corpus] = {"weights": {str(w): r for w, r in rows.items()}, **base,
                                     "default_run": run["lds"], "default_stderr": run["stderr"],
                                     "default_column": column}
    chosen = choose(report, weights)
    report["chosen"] = chosen
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


def choose(report: dict, weights: list[float]) -> float | None:
    """The weight with the best mean tune LDS over the benchmarks among those at least BM25's on every tune half."""
    corpora = report["corpora"].values()
    fair = [w for w in weights if all(c["weights"][str(w)]["tune"] >= c["bm25"]["tune"] for c in corpora)]
    return max(fair, key=lambda w: np.mean([c["weights"][str(w)]["tune"] for c in corpora])) if fair else None


def format_table(report: dict) -> str:
    names = list(report["corpora"])
    head = " | ".join(f"{n} tune | {n} held-out | {n} all" for n in names)
    lines = [f"| influence column | {head} |", "| --- |" + " --- |" * (3 * len(names))]

    def row(label: str, pick) -> str:
        cells = [f"{pick(report['corpora'][n])[k]:.3f}" for n in names for k in ("tune", "held_out", "all")]
        return f"| {label} | " + " | ".join(cells) + " |"

    for w in report["weights"]:
        label = f"mirror + {w:g} x bm25" + (" (chosen)" if w == report["chosen"] else "")
        lines.append(row(label, lambda c, w=w: c["weights"][str(w)]))
    lines.append(row("mirror alone (raw)", lambda c: c["mirror"]))
    lines.append(row("bm25 alone", lambda c: c["bm25"]))
    corpora = report["corpora"]
    runs = ", ".join(f"{n} {corpora[n]['default_run']:.3f} ± {corpora[n]['default_stderr']:.3f} (column "
                     f"`{corpora[n]['default_column']}`)" for n in names)
    chosen = report["chosen"]
    paired = "; ".join(f"{n}: {_paired(corpora[n], chosen, 'bm25')} over bm25, {_paired(corpora[n], chosen, 'mirror')} "
                       "over the mirror alone" for n in names) if chosen is not None else "no weight chosen"
    return ("\n".join(lines) + f"\n\nThe library default, run end to end, LDS over every probe: {runs}"
            f"\nPaired per-probe difference of the chosen weight, all probes (mean ± standard error): {paired}")


def _paired(corpus: dict, weight: float, other: str) -> str:
    diff = np.array(corpus["weights"][str(weight)]["per_probe"]) - np.array(corpus[other]["per_probe"])
    diff = diff[np.isfinite(diff)]
    return f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"


if __name__ == "__main__":
    sys.exit(main())
