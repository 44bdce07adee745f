"""End-to-end cost of each method on a benchmark setup, as a user runs it: wall time and peak RSS, side by side.

    python recipes/benchmark_cost.py [--corpus capitals|wordnet|docstrings] [--methods mirror,bergson_ekfac,...]
        [--threads 1] [--repeats 1] [--json runs/cost.json] [--cache-dir DIR]

The setup is the tail-patch / LDS benchmark's (``benchmarks.lds.full_setup``: the trained model, its corpus and
its probes). The corpus and probes are written to JSON lines files, then each method runs as ``hf-mirror attribute
--method M`` in a fresh process (one torch thread by default, a cold base-loss cache of its own, no progress bars),
one after the other, and ``/usr/bin/time`` reports the process's wall time and peak resident memory. Methods run in
the order given, ``--repeats`` times each (interleaved), and the table reports the median time. A method that cached
a one-time per-model cost (the mirror's curvature factors, under ``$HF_MIRROR_CACHE/curvature``) runs once more
with those factors alone carried over (base losses cold again): the "factors cached" column, the cost of every run
after the first on that model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import offline_defaults


def _run(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under ``/usr/bin/time``: its wall seconds and peak RSS (MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *cmd], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        seconds, kb = Path(stats.name).read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mb": int(kb) / 1024}


def _summary(runs: list[dict]) -> dict:
    """The median wall time and the largest peak RSS of a method's runs (and of its factors-cached reruns)."""
    out = {"seconds": statistics.median(x["seconds"] for x in runs),
           "peak_rss_mb": max(x["peak_rss_mb"] for x in runs), "runs": runs}
    if all("seconds_factors_cached" in x for x in runs):
        out["seconds_factors_cached"] = statistics.median(x["seconds_factors_cached"] for x in runs)
        out["peak_rss_mb_factors_cached"] = max(x["peak_rss_mb_factors_cached"] for x in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    from benchmarks._common import write_json
    from benchmarks.lds import CORPORA, LDSConfig, full_setup

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=CORPORA, default="wordnet")
    p.add_argument("--methods", default="mirror,bm25,bergson_ekfac,ekfac,trackstar",
                   help="comma-separated --method values of hf-mirror attribute (mirror: the defaults)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the quick benchmark size (tests)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="where the benchmark's full model is cached")
    args = p.parse_args(argv)
    setup = full_setup(LDSConfig.for_corpus(args.corpus, quick=args.quick), args.cache_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, probes = work / "corpus.jsonl", work / "probes.jsonl"
        corpus.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in setup.documents))
        probes.write_text("".join(json.dumps({k: q[k] for k in ("id", "prompt", "completion")}) + "\n"
                                  for q in setup.probes))
        for r in range(args.repeats):
            for method in methods:
                env = {**os.environ, "HF_MIRROR_CACHE": str(work / f"cache-{method}-{r}"), "OMP_NUM_THREADS":
                       str(args.threads)}
                def cmd(out: Path, method: str = method) -> list[str]:
                    return [sys.executable, "-m", "hf_mirror.cli", "attribute", "--model", str(setup.directory),
                            "--corpus", str(corpus), "--probes", str(probes), "--output", str(out), "--method",
                            method, "--threads", str(args.threads), "--no-progress"]
                rows[method].append(_run(cmd(work / f"out-{method}-{r}"), env))
                factors = work / f"cache-{method}-{r}" / "curvature"
                if factors.is_dir():  # the same run with the factors cached: the per-model cost paid before
                    warm = work / f"cache-{method}-{r}-factors"
                    shutil.copytree(factors, warm / "curvature")
                    again = _run(cmd(work / f"out-{method}-{r}-factors"), {**env, "HF_MIRROR_CACHE": str(warm)})
                    rows[method][-1] |= {"seconds_factors_cached": again["seconds"],
                                         "peak_rss_mb_factors_cached": again["peak_rss_mb"]}
                print(f"{method}: {rows[method][-1]}", file=sys.stderr)
    report = {"corpus": args.corpus, "documents": len(setup.documents), "probes": len(setup.probes),
              "threads": args.threads, "repeats": args.repeats,
              "methods": {m: _summary(v) for m, v in rows.items()}}
    print(f"{args.corpus}: {report['documents']} documents, {report['probes']} probes, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| method | wall time (s) | peak RSS (MB) | wall time, factors cached (s) |\n| --- | --- | --- | --- |")
    for m, row in report["methods"].items():
        cached = f"{row['seconds_factors_cached']:.1f}" if "seconds_factors_cached" in row else ""
        print(f"| {m} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {cached} |")
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
