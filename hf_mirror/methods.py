"""The method registry: every attribution method by name, behind one call that returns an AttributionResult.

    from hf_mirror import attribute
    attribute(model, corpus, probes, method="bm25")        # or "mirror" (the default), "embedding", ...

``mirror`` is this toolkit's method (:mod:`hf_mirror.pipeline`); the others are scorers in
:mod:`hf_mirror.baselines` that share one skeleton (:func:`hf_mirror.baselines.attribute_baseline`). Adding a
method is a scorer class in ``hf_mirror/baselines/`` and one line here. This module imports nothing heavy, so
the command line lists the methods without loading torch.
"""

from __future__ import annotations

import importlib

# name -> "module:class" of the scorer ("mirror" is the pipeline itself)
REGISTRY: dict[str, str] = {
    "mirror": "hf_mirror.pipeline:attribute",
    "bm25": "hf_mirror.baselines.bm25:BM25Baseline",
    "embedding": "hf_mirror.baselines.embedding:EmbeddingBaseline",
    "gradsim": "hf_mirror.baselines.gradsim:GradSimBaseline",
    "ekfac": "hf_mirror.baselines.ekfac:EKFACBaseline",
    "bergson_ekfac": "hf_mirror.baselines.bergson:BergsonEKFACBaseline",
    "trackstar": "hf_mirror.baselines.bergson:TrackStarBaseline",
}
BASELINES = tuple(name for name in REGISTRY if name != "mirror")


def load(name: str):
    """The object registered under ``name`` (imported on first use)."""
    from hf_mirror.errors import InputError

    if name not in REGISTRY:
        raise InputError(f"Unknown method {name!r}; choose one of {sorted(REGISTRY)}.")
    module, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attr)
