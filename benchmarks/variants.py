"""Mirror variants the evaluation benchmarks run by name: (``ScanConfig`` overrides by flat field name, ``MirrorConfig``
overrides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

MIRROR_VARIANTS: dict[str, tuple[dict, dict]] = {
    "mirror": ({}, {}),  # the library defaults: the hybrid ranking (BM25 candidates, the mirror as a correction)
    "mirror_forward": ({"read": "forward"}, {}),  # the default mirror read by a forward pass per probe
    "mirror_first_order": ({"exact_head": 0}, {}),  # the linear read alone, no head read again (before 2026-12-08)
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
    (:mod:`hf_mirror.methods`; ``options`` go to its scorer). ``scan`` overrides the ``ScanConfig`` of either (flat
    field names, e.g. ``{"read": "forward"}``: :func:`hf_mirror.flags.nested_config` routes each to its group)."""
    from hf_mirror import MirrorConfig, ScanConfig, attribute
    from hf_mirror.flags import nested_config

    scan_overrides, mirror_overrides = MIRROR_VARIANTS.get(name, ({}, {}))
    method = "mirror" if name in MIRROR_VARIANTS else name
    if method != "mirror" and mirror:
        from hf_mirror.errors import InputError

        raise InputError(f"mirror settings apply to the mirror variants only, not to {name!r}.")
    return attribute(model, corpus, probes, tokenizer=tokenizer, output_dir=output_dir, show_progress=show_progress,
                     mirror=MirrorConfig(**{**mirror_overrides, **(mirror or {})}),
                     scan=nested_config(ScanConfig, {**scan_overrides, **(scan or {})}), overwrite=overwrite,
                     method=method, **options)


def parse_method(spec: str, methods: Sequence[str]) -> tuple[str, dict]:
    """``"mirror"`` -> ("mirror", {}); ``"mirror:steps=32:target_rise=1"`` -> ("mirror", {"steps": 32,
    "target_rise": 1}): one of ``methods`` and, for a mirror variant, ``MirrorConfig`` overrides (checked here,
    before any training)."""
    from hf_mirror.errors import InputError
    from hf_mirror.mirror import MirrorConfig

    name, *parts = spec.strip().split(":")
    if name not in methods:
        raise InputError(f"Unknown method {name!r}; choose from {list(methods)}.")
    options = {}
    known = {f.name for f in fields(MirrorConfig)}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise InputError(f"{spec!r}: options are MirrorConfig fields as key=value ({', '.join(sorted(known))}).")
        options[key] = _value(value)
    if options and name not in MIRROR_VARIANTS:
        raise InputError(f"{spec!r}: mirror settings apply to the mirror methods only.")
    MirrorConfig(**{**MIRROR_VARIANTS.get(name, ({}, {}))[1], **options})
    return name, options


def _value(text: str):
    if "|" in text:  # a list, as bergson writes them: target_modules=all-linear|lm_head
        return [_value(part) for part in text.split("|")]
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()
