"""Candidate rules judged by tail-patch: the default mirror over every document and over each rule's candidates.

    python recipes/benchmark_candidates.py [--corpus capitals|wordnet|docstrings] [--sizes 5 10 20] [--quick]
        [--json runs/candidates.json] [--output DIR] [--cache-dir DIR] [--threads 1] [--half held_out|tune|all]

Loads (or trains) the tail-patch benchmark's model and ground truth of the corpus (cached, as
``recipes/benchmark_tail_patch.py``), builds the corpus's index with dense vectors, then runs the default mirror
with ``--candidates all`` and, for each M of ``--sizes``, with ``bm25:2M`` and with ``bm25+dense:M`` (the same
budget of 2M candidates per probe; :mod:`benchmarks.candidates`). Prints a Markdown table of one half of the probes
(held-out by default): per rule, its candidates per probe, and per tail-patch variant the top-10 share, Spearman and
the recall of the true top 10.
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

    from benchmarks._common import write_json
    from benchmarks.candidates import SIZES, format_table, run_candidates
    from benchmarks.lds import LDSConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (well under a minute)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                   help="M of each budget: bm25:2M against bm25+dense:M (default: %(default)s)")
    p.add_argument("--half", choices=["held_out", "tune", "all"], default="held_out", help="the probes printed")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--output", type=Path, default=None, help="keep the index and every run's result here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full model and ground truth are cached")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_config_flags(p, LDSConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LDSConfig.for_corpus(args.corpus or "capitals", quick=args.quick), args)
    report = run_candidates(cfg, args.sizes, args.cache_dir, args.output, log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    print(f"{cfg.corpus}: {report['documents']} documents, {report['probes']} probes; {args.half} probes; index "
          f"built in {report['index_seconds']:.1f} s; torch {report['torch']}")
    print(format_table(report, args.half))
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
