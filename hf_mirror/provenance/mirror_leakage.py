"""Mirror-attribution leakage detector: does one training document stand out for an evaluation item?

Each evaluation item becomes a probe (question -> prompt, answer -> completion; a text-only item is split after
its first part, see :func:`split_item`) and goes through the library's mirror pipeline
(:func:`hf_mirror.attribute`): a LoRA mirror unlearns the item, and every corpus document is scored by how much
its token losses rise. A clean item spreads its influence over many related documents; an item the model was
trained on (verbatim, lightly edited or paraphrased) has one document whose score stands far above the rest.

The statistic, per item, over its scores on all scanned documents: ``top_z = (s1 - median) / scale`` where
``s1`` is the best document's score and ``scale`` a robust spread (1.4826 x the median absolute deviation, so
that it matches the standard deviation of a normal distribution); and the ``margin = (s1 - s2) / scale``
between the best two documents. ``top_z`` is the detector's score (it still fires when a text was injected
twice, where the margin collapses; on the benchmark it also separated injected from clean items better than the
margin); the margin is reported as evidence. The threshold is chosen on data: see
``DEFAULT_MIRROR_THRESHOLD`` and docs/benchmarks_details.md, "Benchmark leakage".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hf_mirror.config import CALIBRATED_MIRROR
from hf_mirror.errors import InputError

# top_z above which an item's best document is said to stand out, for the mirror's verdict on its own. Chosen on
# the injection benchmark (recipes/benchmark_leakage.py): just above every clean item's top_z there (max 44; the
# heavy tail comes from clean items whose best document is an unrelated one). The combined detector does better.
DEFAULT_MIRROR_THRESHOLD = 45.0
_MAD_TO_STD = 1.4826


@dataclass
class EvalItem:
    """One evaluation item: its full text and how it is split into a probe (prompt + completion)."""

    id: object
    text: str
    prompt: str
    completion: str


def split_item(text: str, prompt_fraction: float = 0.25, max_prompt_words: int = 16) -> tuple[str, str]:
    """Split a text-only item into (prompt, completion) that concatenate back to the text.

    A leading label ("dog: ...", "Q: ...", up to the first colon within the first third of the text) is the
    prompt; otherwise the first ``prompt_fraction`` of the words (at least one, at most ``max_prompt_words``).
    The completion keeps its leading space, so ``prompt + completion == text``.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("An evaluation item is empty; every item needs text to split into prompt and completion.")
    colon = text.find(":")
    if 0 < colon <= len(text) / 3 and text[colon + 1 :].strip():
        return text[: colon + 1], text[colon + 1 :]
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        cut = max(1, len(text) // 2)  # one long word: split it in half
        return text[:cut], text[cut:]
    n = min(max(1, round(len(words) * prompt_fraction)), max_prompt_words, len(words) - 1)
    end = words[n - 1].end()
    return text[:end], text[end:]


def make_items(records: Sequence[tuple[object, str] | tuple[object, str, str] | dict]) -> list[EvalItem]:
    """``EvalItem`` s from (id, text), (id, question, answer) or dicts with ``text`` or ``question``/``answer``."""
    items = []
    for r in records:
        if isinstance(r, EvalItem):
            items.append(r)
            continue
        if isinstance(r, dict):
            if "question" in r or "prompt" in r:
                q, a = r.get("question", r.get("prompt")), r.get("answer", r.get("completion", ""))
                r = (r["id"], q, a)
            else:
                r = (r["id"], r["text"])
        if len(r) == 3:
            item_id, q, a = r
            if not a:
                items.append(EvalItem(item_id, q, *split_item(q)))
            else:
                a = a if a[:1].isspace() or q[-1:].isspace() else " " + a
                items.append(EvalItem(item_id, q + a, q, a))
        else:
            item_id, text = r
            items.append(EvalItem(item_id, text, *split_item(text)))
    return items


@dataclass(kw_only=True)
class MirrorEvidence:
    """An item's mirror verdict and evidence: its best documents and how far the first stands out."""

    id: object
    top_z: float  # (best score - median) / robust spread: the detector's score
    margin: float  # (best - second best) / robust spread
    leaked: bool
    top: list[dict] = field(default_factory=list)  # rank, doc_id, score (the run's score), raw_score
    ranking: list = field(default_factory=list)  # every scanned document id, best first (not serialised)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ranking")
        return d


def stand_out(scores: np.ndarray) -> tuple[float, float]:
    """``(top_z, margin)`` of one item's scores over the documents (see the module docstring)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    s = s[np.isfinite(s)]
    if len(s) < 3:
        return float("nan"), float("nan")
    med = float(np.median(s))
    scale = _MAD_TO_STD * float(np.median(np.abs(s - med)))
    if scale <= 0:  # more than half the documents tie: fall back to the standard deviation
        scale = float(s.std())
    if scale <= 0:
        return 0.0, 0.0
    return (s[0] - med) / scale, (s[0] - s[1]) / scale


def mirror_leakage(
    model,
    corpus,
    items: Sequence,
    *,
    tokenizer=None,
    mirror=None,
    scan=None,
    threshold: float = DEFAULT_MIRROR_THRESHOLD,
    output_dir: str | Path | None = None,
    top: int = 5,
    show_progress: bool = False,
    overwrite: bool = False,
) -> dict[object, MirrorEvidence]:
    """Run the mirror pipeline with each item as a probe; per item, how far its best document stands out.

    ``items`` are ``EvalItem`` s or anything :func:`make_items` accepts. ``mirror``/``scan`` are the
    ``MirrorConfig``/``ScanConfig`` of :func:`hf_mirror.attribute` (default scan: ``normalize="loo"``, each
    document's score against the other items' scores: the default z-score across probes is capped at
    sqrt(n - 1), which flattens exactly the outliers this detector looks for). Returns
    ``{item id: MirrorEvidence}``; the attribution run itself is kept in ``output_dir`` when given.
    """
    from hf_mirror.config import RankingConfig, ScoringConfig
    from hf_mirror.mirror import MirrorConfig
    from hf_mirror.pipeline import ScanConfig, attribute

    items = make_items(items)
    if not items:
        raise InputError("No evaluation items to check.")
    scan = scan or ScanConfig(scoring=ScoringConfig(normalize="loo"), ranking=RankingConfig(top_k=top))
    mirror = mirror or MirrorConfig(**CALIBRATED_MIRROR)
    probe_ids = {}
    probes = []
    for i, it in enumerate(items):
        pid = f"item-{i}"
        probe_ids[pid] = it.id
        probes.append({"id": pid, "prompt": it.prompt, "completion": it.completion})
    result = attribute(model, corpus, probes, tokenizer=tokenizer, mirror=mirror, scan=scan, output_dir=output_dir,
                       show_progress=show_progress, overwrite=overwrite)
    scores = result.scores()
    out: dict[object, MirrorEvidence] = {}
    for pid, group in scores.groupby("probe_id", sort=False):
        group = group.sort_values("score", ascending=False, kind="mergesort")
        top_z, margin = stand_out(group["score"].to_numpy())
        best = [{"rank": r + 1, "doc_id": _plain(d), "score": float(s), "raw_score": float(raw)}
                for r, (d, s, raw) in enumerate(zip(group["doc_id"][:top], group["score"][:top],
                                                    group["raw_score"][:top], strict=True))]
        item_id = probe_ids[pid]
        out[item_id] = MirrorEvidence(id=item_id, top_z=float(top_z), margin=float(margin),
                                      leaked=bool(np.isfinite(top_z) and top_z >= threshold), top=best,
                                      ranking=[_plain(d) for d in group["doc_id"]])
    for item_id in probe_ids.values():  # a probe with no scored document (empty corpus)
        out.setdefault(item_id, MirrorEvidence(id=item_id, top_z=float("nan"), margin=float("nan"), leaked=False))
    return {it.id: out[it.id] for it in items}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
