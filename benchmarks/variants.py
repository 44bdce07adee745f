"""Mirror variants the evaluation benchmarks run by name: (``ScanConfig`` overrides, ``MirrorConfig`` overrides)."""

from __future__ import annotations

MIRROR_VARIANTS: dict[str, tuple[dict, dict]] = {
    "mirror": ({}, {}),  # the library defaults: the hybrid ranking (BM25 candidates, the mirror as a correction)
    "mirror_only": ({"rank_by": "mirror"}, {}),  # the default mirror ranking every document alone
    "mirror_raw": ({"normalize": "none", "rank_by": "mirror"}, {}),
    "mirror_zscore": ({"normalize": "zscore", "rank_by": "mirror"}, {}),
    "mirror_loo": ({"normalize": "loo", "rank_by": "mirror"}, {}),
    "mirror_linear": ({"rank_by": "mirror"}, {"target_modules": "all-linear"}),  # attention and MLP of every block
    "mirror_top2": ({"rank_by": "mirror"}, {"layers": [-2, -1]}),  # the top 2 blocks (shared trunk below)
    "mirror_top2_linear": ({"rank_by": "mirror"}, {"layers": [-2, -1], "target_modules": "all-linear"}),
}


def run_method(name: str, model, corpus, probes, *, tokenizer=None, output_dir=None, show_progress: bool = False,
               scan: dict | None = None, mirror: dict | None = None, overwrite: bool = True, **options):
    """Run a benchmark's method by name through :func:`hf_mirror.attribute`: a mirror variant of
    :data:`MIRROR_VARIANTS` (``mirror`` overrides go to its ``MirrorConfig``) or a method of the registry
    (:mod:`hf_mirror.methods`; ``options`` go to its scorer). ``scan`` overrides the ``ScanConfig`` of either."""
    from hf_mirror import MirrorConfig, ScanConfig, attribute

    scan_overrides, mirror_overrides = MIRROR_VARIANTS.get(name, ({}, {}))
    method = "mirror" if name in MIRROR_VARIANTS else name
    if method != "mirror" and mirror:
        from hf_mirror.errors import InputError

        raise InputError(f"mirror settings apply to the mirror variants only, not to {name!r}.")
    return attribute(model, corpus, probes, tokenizer=tokenizer, output_dir=output_dir, show_progress=show_progress,
                     mirror=MirrorConfig(**{**mirror_overrides, **(mirror or {})}),
                     scan=ScanConfig(**{**scan_overrides, **(scan or {})}), overwrite=overwrite, method=method,
                     **options)
