"""Linear datamodeling score (LDS): do a method's scores predict what retraining on data subsets does?

    python recipes/benchmark_lds.py [--corpus capitals|wordnet|docstrings] [--quick]
        [--methods mirror,mirror_raw,bm25,...] [--json runs/lds.json] [--cache-dir DIR] [--n-subsets 24]
        [--n-countries 40] [--n-entries 400] ...

    # mirror settings per row: METHOD:FIELD=VALUE[:FIELD=VALUE...] (MirrorConfig fields)
    python recipes/benchmark_lds.py --corpus wordnet --methods mirror,mirror:steps=3,mirror:target_rise=1:steps=32

Trains a small GPT-2 on a corpus (``--corpus capitals``, the default: the templated fact-tracing corpus;
``--corpus wordnet``: 400 real WordNet entries that the model memorises, probes = 40 headword prompts with the
model's own continuation; ``--corpus docstrings``: 400 first paragraphs of Python standard-library
docstrings, probes = 40 qualified-name prompts such as ``shutil.rmtree:``), retrains it from scratch on random
halves of the corpus (same tokenizer, hyperparameters, seed and data order), and correlates each method's
predicted effect of a subset (the sum of its scores over the subset's documents) with the retrained model's
negative probe loss (Spearman, per probe, averaged over probes); see ``benchmarks.lds``. The retrains' losses
are cached under ``--cache-dir`` (default ``$HF_MIRROR_CACHE/counterfactual``): a second run re-scores methods
without retraining. Prints a Markdown table.
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

    from benchmarks.lds import METHODS, LDSConfig, format_table, run_lds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests (well under a minute)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}; a mirror method may carry MirrorConfig "
                   "settings: mirror:steps=10, mirror:target_rise=1:steps=32")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--output", type=Path, default=None, help="keep every method's result directory here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full model and retrains are cached")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_config_flags(p, LDSConfig, hidden=False)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(LDSConfig.for_corpus(args.corpus or "capitals", quick=args.quick), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_lds(cfg, methods, args.cache_dir, args.output, args.progress,
                     log=lambda s: print(s, file=sys.stderr))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    print(f"{cfg.corpus}: {report['documents']} documents, {report['probes']} probes ({report['correct']} answered "
          f"correctly), "
          f"{cfg.n_subsets} retrained subsets of {report['subset_documents']} documents "
          f"({report['retrain_seconds']:.0f} s retraining in this run)")
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
