"""Blend two mirrors' own columns and score the blend on LDS and tail-patch: is a mix better than either?

    python recipes/benchmark_blend.py --corpus capitals --base lds=DIR tail_patch=DIR --other lds=DIR tail_patch=DIR
        [--weights 0 0.25 0.5 1 2 100] [--quick] [--cache-dir DIR]

Each DIR is a result that ``recipes/benchmark_lds.py --output OUT`` or ``recipes/benchmark_tail_patch.py --output
OUT`` kept for a method spec (``OUT/<spec>/mirror``, e.g. ``runs/lds/mirror/mirror`` and
``runs/lds/mirror_precondition_kfac_target_modules_all-linear/mirror``); either benchmark may be left out. Each
probe's ``raw_score`` row is z-scored over the documents and the blend is ``z(base) + w * z(other)``; printed per
weight: LDS and the tail-patch top-10 share of both variants, tune and held-out halves. ``--reread N ...`` instead
takes each probe's N largest base scores by magnitude from the other column, unscaled (the base read to first
order, its head read again exactly by the other: ``mirror_first_order`` and ``mirror_forward``; what ``--exact-head``
now does in every default run). The retrains and the ground truth come from the benchmarks' cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the package, not in it

from hf_mirror.flags import add_config_flags, apply_overrides, offline_defaults


def zscored(matrix):
    """Each row standardised over its documents."""
    return (matrix - matrix.mean(1, keepdims=True)) / (matrix.std(1, keepdims=True) + 1e-30)


def reread(base, other, n: int):
    """``base`` with each row's ``n`` largest entries by magnitude taken from ``other``: a first-order column whose
    head is read again exactly (``other``, e.g. the forward read of the same mirrors)."""
    import numpy as np

    out = base.copy()
    head = np.argsort(-np.abs(base), axis=1, kind="stable")[:, :n]
    np.put_along_axis(out, head, np.take_along_axis(other, head, axis=1), axis=1)
    return out


def _folders(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for pair in pairs:
        kind, _, folder = pair.partition("=")
        if kind not in ("lds", "tail_patch") or not folder:
            raise SystemExit(f"--base/--other take lds=DIR or tail_patch=DIR, got {pair!r}")
        out[kind] = Path(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    import numpy as np

    from benchmarks.lds import LDSConfig, full_setup, lds_of_matrix, load_or_train, score_matrix
    from benchmarks.tail_patch import VARIANTS, evaluate_matrix, ground_truth
    from hf_mirror.results import AttributionResult

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the benchmarks' test size (as they were run with it)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the full model, retrains and truth are cached")
    p.add_argument("--base", nargs="+", required=True, help="lds=DIR tail_patch=DIR: the first column's results")
    p.add_argument("--other", nargs="+", required=True, help="lds=DIR tail_patch=DIR: the second column's results")
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 100])
    p.add_argument("--reread", type=int, nargs="+", default=None, metavar="N",
                   help="instead of blending: each probe's N largest base scores (by magnitude) taken from the other "
                   "column, unscaled (the other is the same mirrors' exact read)")
    add_config_flags(p, LDSConfig, hidden=False)
    args = p.parse_args(argv)
    base, other = _folders(args.base), _folders(args.other)
    cfg = apply_overrides(LDSConfig.for_corpus(args.corpus or "capitals", quick=args.quick), args)
    setup = full_setup(cfg, args.cache_dir)
    columns = {}
    for kind in sorted(set(base) & set(other)):
        if kind == "lds":
            retrains = load_or_train(cfg, setup, args.cache_dir)[1]
            probes, docs = retrains.probe_ids, retrains.doc_ids
        else:
            probes, docs = [q["id"] for q in setup.probes], [d["id"] for d in setup.documents]
        raw = [score_matrix(AttributionResult.load(f[kind]).scores(), probes, docs, "raw_score") for f in (base, other)]
        columns[kind] = raw if args.reread else [zscored(m) for m in raw]
    truths = {v: ground_truth(setup, v, args.cache_dir)[0] for v in VARIANTS} if "tail_patch" in columns else {}
    if args.reread:
        print(f"{cfg.corpus}: the base with each probe's top N (by magnitude) from the other; tune / held-out halves")
        mix, settings, label = (lambda a, b, n: reread(a, b, int(n))), args.reread, "N"
    else:
        print(f"{cfg.corpus}: z(base) + w z(other); tune / held-out halves")
        mix, settings, label = (lambda a, b, w: a + w * b), args.weights, "w"
    for w in settings:
        cells = []
        if "lds" in columns:
            a, b = columns["lds"]
            per_probe = lds_of_matrix(mix(a, b, w), retrains)["per_probe"]
            values = np.array([per_probe[q] for q in retrains.probe_ids], np.float64)
            cells.append(f"LDS {np.nanmean(values[0::2]):.3f} / {np.nanmean(values[1::2]):.3f}")
        if "tail_patch" in columns:
            a, b = columns["tail_patch"]
            for variant, truth in truths.items():
                r = evaluate_matrix(mix(a, b, w), truth)
                cells.append(f"{variant} share {r['tune']['top_k_share']:.3f} / {r['held_out']['top_k_share']:.3f}")
        print(f"{label} = {w:g}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
