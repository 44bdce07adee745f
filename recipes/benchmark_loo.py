"""Mirrored-hypothesis check: correlation of mirror scores with leave-one-out retraining.

    python recipes/benchmark_loo.py [--quick] [--methods mirror,mirror_raw,ekfac,...] [--json runs/loo.json]
        [--cache-dir DIR] [--n-docs 32] [--n-queries 8] [--train-seeds 2] ...

Trains a small GPT-2 on the fact-tracing corpus, retrains it once without each of ``--n-docs`` documents
(the probes' proponents plus random others; same tokenizer, hyperparameters, seed and data order), and
correlates each method's score for every (probe, document) pair with the actual effect (probe loss without
the document minus with it; ``--train-seeds K`` averages it over K training seeds and reports how well
two seeds' effects agree); see ``benchmarks.loo``. Retrains are cached under ``--cache-dir``
(default ``$HF_MIRROR_CACHE/counterfactual``). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import add_config_flags, apply_overrides, offline_defaults


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    import torch

    from benchmarks.lds import METHODS
    from benchmarks.loo import LOOConfig, format_table, run_loo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (well under a minute)")
    p.add_argument("--methods", default="mirror,mirror_raw", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--output", type=Path, default=None, help="keep every method's result directory here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full model and retrains are cached")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_config_flags(p, LOOConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LOOConfig.quick() if args.quick else LOOConfig(), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_loo(cfg, methods, args.cache_dir, args.output, args.progress,
                     log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    eff = report["effect"]
    print(f"{report['documents']} documents, {report['probes']} probes ({report['correct']} answered correctly), "
          f"{len(report['left_out'])} documents left out ({report['retrain_seconds']:.0f} s retraining in this run)")
    print(f"mean LOO effect on the probe loss: proponent pairs {eff['proponent_mean']:+.4f}, other pairs "
          f"{eff['other_mean']:+.4f} (std {eff['other_std']:.4f})")
    if "seed_agreement" in report:
        agree = report["seed_agreement"]
        print(f"LOO reproducibility (seed {cfg.seed} vs seed {cfg.seed + 1} effects): Pearson {agree['pearson']:.3f}, "
              f"Spearman {agree['spearman']:.3f}, per-probe Spearman {agree['spearman_per_probe']:.3f}")
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
