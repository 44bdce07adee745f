"""Fact-tracing benchmark: MRR and recall@10 of mirror and the baselines on real country -> capital facts.

    python recipes/benchmark_fact_tracing.py [--quick] [--methods mirror,bm25,...] [--json runs/ftrace.json]

Trains a small GPT-2 from scratch on capital facts (three training templates each) among distractor
documents, lets it answer held-out query templates, and asks every method which documents taught each
correct answer (see ``benchmarks.fact_tracing``). Prints a Markdown table with each method's wall
time in the same run.
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

    from benchmarks.fact_tracing import METHODS, FactTracingConfig, format_table, run_benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (about a minute)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--output", type=Path, default=None, help="keep the model and every result here")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="load the trained model from here if saved there (e.g. an earlier --output), else train it "
                        "and save it there")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: tiny models gain little from more, and lose a lot on a busy "
                        "machine)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_config_flags(p, FactTracingConfig)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(FactTracingConfig.quick() if args.quick else FactTracingConfig(), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_benchmark(cfg, methods, args.output, args.progress, log=lambda s: print(s, file=sys.stderr),
                           model_dir=args.model_dir)
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    print(f"{report['correct']}/{report['queries']} held-out queries answered correctly; "
          f"{report['documents']} documents; "
          + (f"model trained in {report['train_seconds']:.0f} s" if report["train_seconds"] is not None
             else "model loaded from --model-dir"))
    print(format_table(report, cfg.top_k))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
