"""Bounded memory: peak RSS and throughput of a scan at N and 10 N documents, side by side.

    python recipes/benchmark_memory.py [--n 1000] [--factor 10] [--probes 2] [--json runs/memory.json]

Each size runs in a fresh process (so its peak RSS is its own) over a corpus of bundled WordNet documents
repeated under new ids, with a tiny model trained in a few seconds. Peak memory should stay flat while the
corpus grows: scores stream to parquet and only each probe's top-k evidence is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> None:
    from hf_mirror import Corpus, MirrorConfig, ScanConfig, ScoringConfig, SpeedConfig, WindowConfig, attribute

    probes = [json.loads(line) for line in Path(args.probes_file).read_text().splitlines()]
    t0 = time.perf_counter()
    result = attribute(args.model, Corpus(args.corpus, id_column="id"), probes, output_dir=args.output,
                       mirror=MirrorConfig(), scan=ScanConfig(windows=WindowConfig(batch_size=64),
                                                              scoring=ScoringConfig(normalize="none"),
                                                              speed=SpeedConfig(cache=False)),
                       show_progress=False)
    elapsed = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"documents": result.config["stats"]["documents"], "tokens": result.config["stats"]["tokens"],
                      "seconds": elapsed, "peak_rss_mb": peak_mb}))


def _prepare(work: Path, n_max: int, n_probes: int) -> tuple[Path, list[dict]]:
    from hf_mirror import demo
    from hf_mirror.tiny_lm import train_tiny_lm

    facts = demo.load_facts()
    model_dir = work / "model"
    train_tiny_lm([f["text"] for f in facts[:300]], model_dir, epochs=2, vocab_size=1000)
    probes = [{"id": f["headword"], "prompt": f["prompt"], "completion": f["completion"]} for f in facts[:n_probes]]
    return model_dir, probes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="documents in the small corpus")
    p.add_argument("--factor", type=int, default=10, help="the large corpus has factor x n documents")
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--probes-file", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return

    from hf_mirror import demo

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, probes = _prepare(work, args.n * args.factor, args.probes)
        probes_file = work / "probes.jsonl"
        probes_file.write_text("".join(json.dumps(q) + "\n" for q in probes))
        facts = demo.load_facts()
        for n in (args.n, args.n * args.factor):
            corpus = work / f"corpus-{n}.jsonl"
            with corpus.open("w") as f:
                for i in range(n):
                    f.write(json.dumps({"id": f"doc-{i}", "text": facts[i % len(facts)]["text"]}) + "\n")
            cmd = [sys.executable, __file__, "--child", "--model", str(model_dir), "--corpus", str(corpus),
                   "--probes-file", str(probes_file), "--output", str(work / f"out-{n}")]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            stats = json.loads(out.strip().splitlines()[-1])
            rows.append({**stats, "docs_per_s": stats["documents"] / stats["seconds"],
                         "tokens_per_s": stats["tokens"] / stats["seconds"]})
    print(f"{'documents':>10} {'tokens':>10} {'seconds':>8} {'docs/s':>8} {'tokens/s':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['documents']:>10} {r['tokens']:>10} {r['seconds']:>8.1f} {r['docs_per_s']:>8.0f} "
              f"{r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>12.0f}")
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS at {args.factor}x the documents: {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "rss_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
