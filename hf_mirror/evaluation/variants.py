"""Mirror variants the evaluation benchmarks run by name: (``ScanConfig`` overrides, ``MirrorConfig`` overrides)."""

from __future__ import annotations

MIRROR_VARIANTS: dict[str, tuple[dict, dict]] = {
    "mirror": ({}, {}),  # the library defaults
    "mirror_raw": ({"normalize": "none"}, {}),
    "mirror_zscore": ({"normalize": "zscore"}, {}),
    "mirror_loo": ({"normalize": "loo"}, {}),
    "mirror_linear": ({}, {"target_modules": "all-linear"}),  # attention and MLP of every block
    "mirror_top2": ({}, {"layers": [-2, -1]}),  # the top 2 blocks (shared trunk below)
    "mirror_top2_linear": ({}, {"layers": [-2, -1], "target_modules": "all-linear"}),
}
