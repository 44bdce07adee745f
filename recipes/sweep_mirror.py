"""Choose the mirror's defaults by data: sweep its settings on fact tracing, tune half vs held-out half.

    python recipes/sweep_mirror.py [--quick] [--model-dir runs/ftrace/model] [--json runs/sweep.json]

Trains (or loads from --model-dir) the fact-tracing model of ``recipes/benchmark_fact_tracing.py``, splits its
correctly answered queries into a tune half and a test half, and scores every mirror setting (steps, learning
rate, direction, rank, layers, prompt in the probe loss, token aggregation, normalisation, ensembles) on both
(see ``benchmarks.sweep``). Prints a Markdown table; the setting with the best tune MRR is in bold.
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

    from benchmarks.fact_tracing import FactTracingConfig
    from benchmarks.sweep import GRIDS, format_table, run_sweep

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the benchmark's small size (for tests)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="load the trained model from here if saved there, else train and save it there")
    p.add_argument("--output", type=Path, default=None, help="keep every run's result here")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--grid", choices=["coarse", "steps", "layers"], default="coarse",
                   help="coarse: one change at a time from the first defaults; steps: the second stage, around more "
                        "steps; layers: top-2-block mirrors (the shared trunk) against all blocks")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    add_config_flags(p, FactTracingConfig)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(FactTracingConfig.quick() if args.quick else FactTracingConfig(), args)
    report = run_sweep(cfg, GRIDS[args.grid](cfg.n_layer), output_dir=args.output, model_dir=args.model_dir,
                       log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    print(f"{report['correct']} correct answers ({len(report['tune'])} tune, {len(report['test'])} test); "
          f"{report['documents']} documents")
    print(format_table(report, cfg.top_k))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
