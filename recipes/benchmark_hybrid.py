"""Hybrid benchmark: how the default ranking should combine BM25 and the mirror, chosen by data.

    python recipes/benchmark_hybrid.py [--quick] [--wordnet-probes 40] [--no-fact-tracing] [--output runs/hybrid]
    python recipes/benchmark_hybrid.py --union [--output runs/hybrid]
    python recipes/benchmark_hybrid.py --normalizations [--output runs/hybrid]

Runs BM25 and the default mirror once per benchmark (full scan), then scores every combination rule
(``benchmarks.hybrid.RULES``) on the tune half of the probes and reports it on the held-out half.
Prints one Markdown table per benchmark and the rule chosen on the tune halves (``benchmarks.hybrid.choose``: the
best mean MRR + recall@10, ties broken by mean average precision, then by the least say for the mirror); writes
hybrid.json. ``--union`` instead compares the candidate sets of ``--retrievers bm25`` and ``bm25 dense`` (issue
#13) on the same score tables: candidate recall and the default hybrid's MRR / recall@10 with each; writes
union.json. ``--normalizations`` scores the hybrid with the mirror's scores normalised across the probes
(``ScanConfig.scoring.normalize``: none, zscore, loo) from the same tables; writes normalizations.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import add_config_flags, apply_overrides, offline_defaults


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    import torch

    from benchmarks.hybrid import (
        HybridConfig,
        format_normalizations,
        format_paired,
        format_table,
        format_union,
        run_hybrid,
        run_normalizations,
        run_union,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("runs/hybrid"), help="results, models and hybrid.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models, busy machines)")
    p.add_argument("--union", action="store_true", help="compare bm25 with bm25 + dense candidates (union.json)")
    p.add_argument("--normalizations", action="store_true",
                   help="the hybrid with the mirror normalised across probes (none/zscore/loo; normalizations.json)")
    add_config_flags(p, HybridConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(HybridConfig(), args)
    if args.union:
        print(format_union(run_union(cfg, args.output, log=lambda s: print(s, file=sys.stderr))["benchmarks"],
                           cfg.top_k))
        return 0
    if args.normalizations:
        print(format_normalizations(run_normalizations(cfg, args.output, log=lambda s: print(s, file=sys.stderr)),
                                    cfg.top_k))
        return 0
    report = run_hybrid(cfg, args.output, log=lambda s: print(s, file=sys.stderr))
    print(format_table(report["benchmarks"], cfg.top_k))
    print(f"chosen on the tune halves (best mean MRR + recall@{cfg.top_k}; ties: the best mean "
          f"average precision, then the least mirror): {report['chosen']}")
    print("\nThe default rule against BM25, probe by probe (paired bootstrap over probes):\n")
    print(format_paired(report["benchmarks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
