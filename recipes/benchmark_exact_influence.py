"""Exact first-order influence by parameter group, against tail-patch and LDS (small models only).

    python recipes/benchmark_exact_influence.py [--corpus capitals|wordnet|docstrings] [--quick]
        [--json runs/exact_capitals.json] [--cache-dir DIR] [--threads 1]

Loads (or trains) the LDS benchmark's full model, its tail-patch ground truth and, for capitals and wordnet, its
retrains (all cached under ``--cache-dir``), keeps every document's gradient, and scores the exact gradient inner
products restricted to each parameter group, plain and RMS-preconditioned (``benchmarks.exact_influence``). Prints
a Markdown table: held-out and tune halves.
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
    from benchmarks.exact_influence import format_table, run_exact_influence
    from benchmarks.lds import LDSConfig, full_setup, load_or_train
    from benchmarks.tail_patch import VARIANTS, ground_truth

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--cache-dir", type=Path, default=None, help="the models, ground truth and retrains cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-lds", action="store_true", help="skip LDS (no retrains are trained or read)")
    add_config_flags(p, LDSConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LDSConfig.for_corpus(args.corpus or "capitals", quick=args.quick), args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    setup = full_setup(cfg, args.cache_dir, log)
    truths = {v: ground_truth(setup, v, args.cache_dir, log)[0] for v in VARIANTS}
    retrains = None if args.no_lds else load_or_train(cfg, setup, args.cache_dir, log)[1]
    report = run_exact_influence(setup, truths, retrains, log=log)
    report["corpus"] = cfg.corpus
    report["command"] = "python recipes/benchmark_exact_influence.py " + " ".join(argv or sys.argv[1:])
    print(f"{cfg.corpus}: {report['documents']} documents, {report['probes']} probes")
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
