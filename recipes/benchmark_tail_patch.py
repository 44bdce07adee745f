"""Tail-patch benchmark: does a method's top 10 hold the documents whose training moves the probe most?

    python recipes/benchmark_tail_patch.py [--corpus capitals|wordnet|docstrings] [--quick]
        [--methods bm25,mirror,mirror:steps=3] [--json runs/tail_patch.json] [--cache-dir DIR] [--threads 1]

Trains (or loads) the LDS benchmark's full model of the corpus (``benchmarks.lds.full_setup``), then computes the
exact effect of training on each document: from the trained weights, 1 SGD step (lr 1e-2, the linear regime) or
3 Adam steps (lr 3e-4, a tenth of the training peak lr; ``--sgd-lr`` and ``--adam-lr`` change them) on the
document, and the change of every probe's completion log-probability (``benchmarks.tail_patch``). Each method is
scored by the share of the best possible top-10 effect that its own top 10 reaches, and by Spearman over all
documents (mean over probes; the tune and held-out halves). The ground truth is cached under ``--cache-dir``
(default ``$HF_MIRROR_CACHE/counterfactual``): a second run re-scores methods in seconds. Prints a Markdown table.
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
    from benchmarks.lds import METHODS, LDSConfig
    from benchmarks.tail_patch import ADAM_LR, SGD_LR, VARIANTS, format_table, proponent_summary, run_tail_patch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (well under a minute)")
    p.add_argument("--methods", default="bm25,mirror",
                   help=f"comma-separated subset of {','.join(METHODS)}; a mirror method may carry MirrorConfig "
                   "settings: mirror:steps=3")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--output", type=Path, default=None, help="keep every method's result directory here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full model and ground truth are cached")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--sgd-lr", type=float, default=SGD_LR, help=f"the SGD variant's lr (default {SGD_LR:g})")
    p.add_argument("--adam-lr", type=float, default=ADAM_LR, help=f"the Adam variant's lr (default {ADAM_LR:g})")
    add_config_flags(p, LDSConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LDSConfig.for_corpus(args.corpus or "capitals", quick=args.quick), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = {"sgd": {**VARIANTS["sgd"], "lr": args.sgd_lr}, "adam": {**VARIANTS["adam"], "lr": args.adam_lr}}
    report = run_tail_patch(cfg, methods, args.cache_dir, args.output, args.progress,
                            log=lambda s: print(s, file=sys.stderr), variants=variants)
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    seconds = sum(v["seconds"] for v in report["variants"].values())
    print(f"{cfg.corpus}: {report['documents']} documents, {report['probes']} probes ({report['correct']} answered "
          f"correctly); ground truth {seconds:.0f} s in this run; Python {report['python']}, torch {report['torch']}")
    print(format_table(report))
    print()
    print(proponent_summary(report))
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
