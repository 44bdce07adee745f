"""Choosing the mirror's defaults by data: a sweep of mirror settings on the fact-tracing benchmark.

The model's correctly answered queries are split into a *tune* half and a *test* half (by a hash of the query
id, so the split does not depend on which queries happen to be answered). Settings are compared on the tune
half; the test half, never looked at to choose, gives the figure reported for the chosen setting.

Each mirror setting is one :func:`hf_mirror.attribute` run with ``normalize="none"`` (raw deltas, base
losses from the cache); normalisations and the sum aggregation are applied to its score table afterwards,
exactly as the scan would (every probe of the run is in the pool), so one run yields several rows.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.fact_tracing import (
    FactTracingConfig,
    answer_queries,
    build_benchmark,
    load_or_train,
    rankings,
    retrieval_metrics,
)
from hf_mirror.errors import InputError
from hf_mirror.mirror import MirrorConfig
from hf_mirror.scoring import normalize_scores

# the grids below tune the step-fitted mirror (the default before 2026-12-07): its settings start from it
STEP_MIRROR = MirrorConfig(fit="steps", target_modules=None)


@dataclass
class Setting:
    """One point of the sweep: mirror overrides, the scan's token aggregation, and runs to average."""

    name: str
    mirror: dict = field(default_factory=dict)
    aggregate: str = "mean"
    ensemble: tuple[str, ...] = ()  # names of earlier settings whose normalised scores are averaged


def default_grid(n_layer: int) -> list[Setting]:
    """The first stage: one change at a time from the first defaults (3 Adam ascent steps, lr 5e-3, rank 8)."""
    first = {"steps": 3}
    grid = [
        Setting("steps=3"),
        Setting("steps=1", {"steps": 1}),
        Setting("steps=5", {"steps": 5}),
        Setting("steps=10,lr=2e-3", {"steps": 10, "lr": 2e-3}),
        Setting("lr=1e-3", {"lr": 1e-3}),
        Setting("lr=2e-2", {"lr": 2e-2}),
        Setting("direction=learn", {"direction": "learn"}),
        Setting("rank=4", {"rank": 4}),
        Setting("rank=16", {"rank": 16}),
        Setting("layers=top2", {"layers": list(range(max(0, n_layer - 2), n_layer))}),
        Setting("layers=top1", {"layers": [n_layer - 1]}),
        Setting("include_prompt", {"include_prompt": True}),
        Setting("aggregate=max", aggregate="max"),
        Setting("seed=1", {"seed": 1}),
        Setting("seed=2", {"seed": 2}),
        Setting("ensemble seeds 0-2", ensemble=("steps=3", "seed=1", "seed=2")),
        Setting("ensemble steps 1,3,5", ensemble=("steps=1", "steps=3", "steps=5")),
    ]
    return [replace(s, mirror={**first, **s.mirror}) if not s.ensemble else s for s in grid]


def steps_grid(n_layer: int) -> list[Setting]:
    """The second stage, around the first stage's winner (more ascent steps): how many, and with what."""
    top2 = list(range(max(0, n_layer - 2), n_layer))
    return [
        Setting("steps=5", {"steps": 5}),
        Setting("steps=8", {"steps": 8}),
        Setting("steps=12", {"steps": 12}),
        Setting("steps=20", {"steps": 20}),
        Setting("steps=8,lr=1e-2", {"steps": 8, "lr": 1e-2}),
        Setting("steps=8,rank=16", {"steps": 8, "rank": 16}),
        Setting("steps=8,layers=top2", {"steps": 8, "layers": top2}),
        Setting("steps=8,include_prompt", {"steps": 8, "include_prompt": True}),
        Setting("steps=8,seed=1", {"steps": 8, "seed": 1}),
        Setting("ensemble steps=8 seeds 0-1", ensemble=("steps=8", "steps=8,seed=1")),
        Setting("ensemble steps 5,8,12", ensemble=("steps=5", "steps=8", "steps=12")),
    ]


def layers_grid(n_layer: int) -> list[Setting]:
    """Stage 4: what mirrors on the top 2 blocks (the shared-trunk speed-up) cost in quality, and whether adapting
    the MLPs too, or pushing harder, wins it back; from the current defaults (8 steps, rank 16)."""
    top2 = list(range(max(0, n_layer - 2), n_layer))
    lin = {"target_modules": "all-linear"}
    return [
        Setting("defaults"),
        Setting("all-linear", lin),
        Setting("top2", {"layers": top2}),
        Setting("top2,all-linear", {"layers": top2, **lin}),
        Setting("top2,all-linear,lr=2e-2", {"layers": top2, **lin, "lr": 2e-2}),
        Setting("top2,all-linear,steps=20", {"layers": top2, **lin, "steps": 20}),
    ]


GRIDS = {"coarse": default_grid, "steps": steps_grid, "layers": layers_grid}


def split_half(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tune, test): each id lands in one half by the parity of its SHA-256."""
    tune = [i for i in ids if hashlib.sha256(str(i).encode()).digest()[0] % 2 == 0]
    return tune, [i for i in ids if i not in set(tune)]


def normalized(raw: pd.DataFrame, normalize: str) -> pd.DataFrame:
    """The ``probe_id, doc_id, score`` table for raw scores normalised across each document's probes."""
    wide = raw.pivot(index="doc_id", columns="probe_id", values="raw_score")
    values = np.apply_along_axis(normalize_scores, 1, wide.to_numpy(np.float64), normalize)
    out = pd.DataFrame(values, index=wide.index, columns=wide.columns)
    return out.reset_index().melt(id_vars="doc_id", var_name="probe_id", value_name="score")


def run_sweep(cfg: FactTracingConfig, grid: Sequence[Setting] | None = None, output_dir: str | Path | None = None,
              model_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every setting of ``grid`` and score it (MRR, recall@k) on the tune and test halves."""
    from hf_mirror import RankingConfig, ScanConfig, ScoringConfig, WindowConfig, attribute
    from hf_mirror.corpus import Corpus

    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    if grid is not None:
        _check_grid(grid)
    bench = build_benchmark(cfg)
    model, tokenizer, _ = load_or_train(bench, cfg, model_dir or work / "model", log)
    grid = list(grid) if grid is not None else default_grid(model.config.num_hidden_layers)
    answers = answer_queries(model, tokenizer, bench, cfg.max_new_tokens)
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in answers if a["correct"]]
    if len(probes) < 4:
        raise InputError(f"Only {len(probes)} queries answered correctly: too few to split into tune and test.")
    tune, test = split_half([p["id"] for p in probes])
    log(f"{len(probes)} correct answers: {len(tune)} to tune on, {len(test)} held out")
    corpus = Corpus([{"id": d["id"], "text": d["text"]} for d in bench.documents], id_column="id")
    raws: dict[str, pd.DataFrame] = {}
    rows = []
    for s in grid:
        t0 = time.perf_counter()
        if not s.ensemble:
            scan = ScanConfig(windows=WindowConfig(batch_size=32),
                              scoring=ScoringConfig(normalize="none", aggregate=s.aggregate),
                              ranking=RankingConfig(top_k=cfg.top_k))
            result = attribute(model, corpus, probes, tokenizer=tokenizer, mirror=replace(STEP_MIRROR, **s.mirror),
                               scan=scan, output_dir=work / "runs" / s.name, show_progress=False, overwrite=True)
            raws[s.name] = result.scores()[["probe_id", "doc_id", "raw_score", "n_tokens"]]
        seconds = time.perf_counter() - t0
        for normalize in ("none", "zscore"):
            for aggregate in (("mean", "sum") if s.aggregate == "mean" and not s.ensemble else (s.aggregate,)):
                scores = _scores(raws, s, normalize, aggregate)
                ranked = {half: rankings(scores, ids) for half, ids in (("tune", tune), ("test", test))}
                row = {"setting": s.name, "normalize": normalize, "aggregate": aggregate, "seconds": seconds}
                for half, r in ranked.items():
                    row.update({f"{half} {k}": v for k, v in retrieval_metrics(r, bench.proponents, cfg.top_k).items()})
                rows.append(row)
                log(f"{s.name} {normalize} {aggregate}: tune MRR {row['tune mrr']:.3f}, test MRR {row['test mrr']:.3f}")
    best = max(rows, key=lambda r: (r["tune mrr"], r[f"tune recall@{cfg.top_k}"]))
    return {"config": asdict(cfg), "documents": len(bench.documents), "correct": len(probes), "tune": tune,
            "test": test, "rows": rows, "best": best, "grid": [asdict(s) for s in grid]}


def _check_grid(grid: Sequence[Setting]) -> None:
    names = [s.name for s in grid]
    if len(set(names)) != len(names):
        raise InputError(f"Setting names must be unique: {names}.")
    for i, s in enumerate(grid):
        missing = [e for e in s.ensemble if e not in names[:i]]
        if missing:
            raise InputError(f"Setting {s.name!r} ensembles {missing}, which must come earlier in the grid.")


def _scores(raws: dict[str, pd.DataFrame], s: Setting, normalize: str, aggregate: str) -> pd.DataFrame:
    frames = []
    for name in s.ensemble or (s.name,):
        raw = raws[name].copy()
        if aggregate == "sum":
            raw["raw_score"] = raw["raw_score"] * raw["n_tokens"]
        frames.append(normalized(raw, normalize).set_index(["probe_id", "doc_id"])["score"])
    return pd.concat(frames, axis=1).mean(axis=1).rename("score").reset_index()


def format_table(report: dict, k: int = 10) -> str:
    """The sweep's rows as a Markdown table (the setting chosen on the tune half in bold)."""
    lines = [f"| setting | normalize | aggregate | tune MRR | tune recall@{k} | test MRR | test recall@{k} | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        mark = "**" if r is report["best"] or r == report["best"] else ""
        lines.append(f"| {mark}{r['setting']}{mark} | {r['normalize']} | {r['aggregate']} | {r['tune mrr']:.3f} | "
                     f"{r[f'tune recall@{k}']:.3f} | {r['test mrr']:.3f} | {r[f'test recall@{k}']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)
