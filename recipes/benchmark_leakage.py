"""Leakage-injection benchmark: exact copies, near copies and paraphrases of evaluation items in a corpus.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python recipes/benchmark_leakage.py [--quick] [--json out.json]

Prints a Markdown table (per injection type and detector: top-1/top-5 hit rate of the injected document,
AUROC injected vs clean, TPR at 1% FPR, share flagged at the default threshold). Logic:
benchmarks/leakage.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import add_config_flags, apply_overrides, offline_defaults

offline_defaults()


def main() -> None:
    from benchmarks.leakage import LeakageBenchmarkConfig, format_table, run_benchmark, summarize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a test-sized run (well under a minute)")
    parser.add_argument("--json", default=None, help="write the full result here")
    parser.add_argument("--output", default=None, help="keep the corpus, model and mirror run in this directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rescore", default=None, metavar="JSON",
                        help="recompute the table of an earlier --json result at the current default thresholds")
    add_config_flags(parser, LeakageBenchmarkConfig, hidden=False)
    args = parser.parse_args()

    if args.rescore:
        with open(args.rescore) as f:
            result = summarize(json.load(f), membership=args.membership or "mink")
        print(format_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2, default=str)
        return

    import torch

    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LeakageBenchmarkConfig.quick() if args.quick else LeakageBenchmarkConfig(), args)
    start = time.perf_counter()
    result = run_benchmark(cfg, args.output, show_progress=not args.quick)
    result["wall_seconds"] = time.perf_counter() - start
    print(f"{result['documents']} documents, {result['items']} items; model trained in {result['train_seconds']:.0f} s,"
          f" detectors ran in {result['detect_seconds']:.0f} s, whole run {result['wall_seconds']:.0f} s\n")
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
