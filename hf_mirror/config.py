"""The one source of every default: the mirror's and the scan's settings, with the help text of their flags.

``hf-mirror attribute`` generates its flags from these dataclasses (:mod:`hf_mirror.flags`), so the command
line and the Python call run the same mirror. A field whose value changes a result is marked so
(``option(..., changes_result=True)``); a run's identity is :func:`result_settings` of its config, so a rerun with
another value of a marked field into the same output is refused. :class:`ScanConfig` holds its settings in groups by
concern; their fields keep flat names (the flags', and config.json's ``"scan"``). This module imports neither torch
nor the Hugging Face libraries.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from hf_mirror.errors import InputError
from hf_mirror.flags import flat_config as flat_config  # re-exported: a config as flat names
from hf_mirror.flags import flat_fields, option
from hf_mirror.flags import nested_config as nested_config  # re-exported: a config from flat names
from hf_mirror.flags import result_fields as result_fields  # re-exported: the fields marked changes_result
from hf_mirror.flags import result_settings as result_settings  # re-exported: their values, as they key a run

DIRECTIONS = ("unlearn", "learn")
OPTIMIZERS = ("adam", "adamw", "sgd")
FITS = ("steps", "gradient")
CURVATURES = ("none", "kfac", "ekfac", "rms")
PRECISIONS = ("no", "bf16", "fp16")
# influence = mirror / sd + this x BM25 / sd: 0 with the gradient mirror, chosen on the tune halves of the tail-patch
# and LDS benchmarks (docs/benchmarks_tail_patch.md; 0.5 suited the step-fitted mirror: benchmark_lexical_prior.py)
LEXICAL_WEIGHT = 0.0
RETRIEVERS = ("bm25", "dense")  # the candidate stage's retrievers (RetrievalConfig.retrievers)
AUTO_CANDIDATES = 20  # BM25 candidates per probe in the default pipeline (docs/benchmarks_hybrid.md)
# the mirror's say in the final ranking: 0 ranks the candidates by BM25 alone (the mirror's influence stays beside
# it, in the mirror and influence columns); chosen on the tune halves of recipes/benchmark_hybrid.py
MIRROR_WEIGHT = 0.0
FULL_SCAN_MAX = 5000  # --candidates auto scans every document of a corpus up to this size (forward read)
# ... and under the linear read, whose cost hardly grows with the probes (a forward and a backward pass per batch, plus
# a fraction of a forward pass per probe): the influence column complete by default up to 100k documents (issue #25)
LINEAR_FULL_SCAN_MAX = 100_000
# the leakage detector's thresholds were chosen with 3-step mirrors (docs/benchmarks_details.md, "Benchmark leakage")
CALIBRATED_STEPS = 3
GRADIENT_FIELDS = ("fit", "precondition", "step_rise", "damping", "curvature_docs")  # what only fit="gradient" reads
STEP_FIELDS = ("steps", "target_rise", "lr", "optimizer")  # what only fit="steps" reads
# the mirror's default modules: every linear layer of the blocks, the output layer and the embedding tables (chosen on
# the tune halves of the tail-patch and LDS benchmarks, docs/benchmarks_tail_patch.md)
DEFAULT_TARGETS = ("all-linear", "lm_head", "embeddings")
# the leakage detector's mirror: its thresholds were calibrated with 3 Adam steps on PEFT's default modules
CALIBRATED_MIRROR = {"fit": "steps", "target_modules": None, "steps": CALIBRATED_STEPS}


def parse_candidates(spec: str | int | None) -> int | str | None:
    """``"bm25:200"`` (or ``200``) -> 200; ``"all"`` (or None) -> None (scan everything); ``"auto"`` -> ``"auto"``."""
    if spec is None or isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return spec
    text = str(spec).strip().lower()
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    method, _, m = text.rpartition(":")
    if method not in ("", "bm25") or not m.isdigit() or int(m) < 1:
        raise InputError(f"--candidates takes auto, all or bm25:M with M a positive number of documents, got "
                         f"{spec!r}.")
    return int(m)


def parse_retrievers(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """``["bm25"]`` or ``["bm25", "dense"]`` (in that order, once each) from ``--retrievers``'s values."""
    given = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in given if n not in RETRIEVERS]
    if unknown or "bm25" not in given:
        why = f"unknown {unknown}" if unknown else f"got {given}: BM25 ranks the candidates, dense only adds to them"
        raise InputError(f"--retrievers takes bm25, or bm25 dense ({why}).")
    return [n for n in RETRIEVERS if n in given]


def positive_nats(text: str) -> float:
    """An argparse type for ``--target-rise``: a finite number of nats above 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of nats, got {text}")
    return value


@dataclass(kw_only=True)
class MirrorConfig:
    """How each probe's LoRA mirror is fitted.

    ``direction="unlearn"`` takes gradient *ascent* steps on the probe loss (the paper's choice);
    ``"learn"`` takes descent steps. ``target_modules=None`` uses PEFT's default for the architecture (the
    attention projections), ``"all-linear"`` every linear layer but the output head (attention and MLP);
    ``layers`` restricts the adapter to those transformer block indices (negative ones count from the top: ``[-2, -1]``
    is the top 2 blocks of any model; the default modules then become the blocks' linear layers alone).

    ``fit="gradient"`` (the default) writes each mirror in closed form: one step along the probe's gradient on every
    adapted layer (its best rank-``rank`` approximation), scaled so the probe loss moves ``step_rise`` nats to first
    order; with ``precondition`` the gradient is RMS, K-FAC or EK-FAC preconditioned (:mod:`hf_mirror.curvature`). A
    document's loss then moves by ``step_rise`` x its gradient's inner product with the probe's (over its norm):
    the influence a training step on the document has on the probe, read by forward passes. The defaults (every
    linear layer of the blocks, the output layer and the embedding tables; the gradient divided by its root mean
    square over a corpus sample, Adam's normaliser, ``precondition="rms"``; a 0.01-nat step) were chosen on tune
    halves of the tail-patch and LDS benchmarks (docs/benchmarks_tail_patch.md). ``fit="steps"`` takes ``steps``
    optimizer steps instead (the mirror before 2026-12-07, and the leakage detector's). ``target_rise`` makes the
    strength of the perturbation the same for every probe instead of its step count: each mirror is fitted until its
    probe loss has risen (unlearn) or fallen (learn) by that many nats, at most
    ``steps`` steps (docs/benchmarks_lds_real_text.md).
    """

    rank: int = option(16, min=1, help="LoRA rank of each mirror")
    alpha: float = option(16.0, help="LoRA alpha")
    dropout: float = option(0.0, min=0, help="LoRA dropout")
    target_modules: list[str] | str | None = option(
        default_factory=lambda: list(DEFAULT_TARGETS), flag={"nargs": "+", "type": str},
        help="modules to adapt (default all-linear lm_head embeddings: attention and MLP of every block, the output "
        "layer and the token (and position) embedding tables; all-linear: the blocks' linear layers alone; none: "
        "PEFT's mapping for the model, the attention)")
    layers: list[int] | None = option(
        None, help="block indices to adapt, negative from the top (-2 -1: the top 2; default: all)")
    steps: int = option(8, min=0, help="optimizer steps per mirror (chosen by the sweep); with --target-rise, "
                        "the most steps a mirror may take")
    target_rise: float | None = option(
        None, flag={"type": positive_nats},
        help="fit each mirror until its probe loss has moved this many nats in the fitting direction (rises for "
        "unlearn, falls for learn), at most --steps steps; a probe that reached it stops moving while the others "
        "go on (default: off, every mirror takes --steps steps)")
    lr: float = option(5e-3, help="learning rate of the mirror's optimizer (> 0)")
    optimizer: Literal["adam", "adamw", "sgd"] = option("adam", help="the mirror's optimizer")
    direction: Literal["unlearn", "learn"] = option(
        "unlearn", help="unlearn = gradient ascent on the probe loss, learn = descent")
    seed: int = option(0, help="seed of the LoRA initialisation and of the control probes")
    include_prompt: bool = option(False, help="count prompt tokens in the probe loss")
    fit_batch: int = option(16, min=1, help="probes fitted together in one batch (same adapters as 1, faster; "
                            "lower it to save memory)")
    fit: Literal["steps", "gradient"] = option(
        "gradient", help="steps: --steps optimizer steps on the probe loss; gradient: one step along the probe's "
        "(preconditioned) gradient written in closed form as the LoRA adapter (its best rank-R "
        "approximation per layer, R = --rank), scaled so the probe loss moves --step-rise nats to first order")
    precondition: Literal["none", "kfac", "ekfac", "rms"] = option(
        "rms", help="gradient fit: the curvature that preconditions the probe's gradient (K-FAC or EK-FAC factors, "
        "or rms: each weight's gradient root mean square, Adam's normaliser; fitted once per model on the corpus's "
        "first --curvature-docs documents and cached)")
    step_rise: float = option(0.01, help="gradient fit: the probe-loss change of the step to first order (nats, > 0)")
    damping: float = option(0.1, min=0, help="gradient fit: the curvature's damping, a share of its mean eigenvalue")
    curvature_docs: int = option(512, min=1, help="gradient fit: corpus documents the curvature is fitted on")

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.steps < 0 or self.rank < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError("Mirror needs steps >= 0, rank >= 1 and lr > 0.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.target_modules == ["all-linear"]:  # from the command line
            self.target_modules = "all-linear"
        if self.target_modules in (["none"], "none"):
            self.target_modules = None
        if self.precondition is None:  # "none" read as a value (benchmark specs, JSON)
            self.precondition = "none"
        if (self.layers is not None and isinstance(self.target_modules, list) and "embeddings" in self.target_modules
                and self.target_modules != list(DEFAULT_TARGETS)):
            raise InputError("--layers restricts the mirror to those blocks, and the embedding tables lie below every "
                             "block: drop 'embeddings' from --target-modules or drop --layers.")
        if self.fit_batch < 1:
            raise InputError("fit_batch (probes fitted together) must be at least 1.")
        if self.target_rise is not None and not self.target_rise > 0:
            raise InputError(f"target_rise must be a positive number of nats, got {self.target_rise}.")
        if self.fit not in FITS or self.precondition not in CURVATURES:
            raise InputError(f"fit must be one of {FITS} and precondition one of {CURVATURES}, got {self.fit!r} and "
                             f"{self.precondition!r}.")
        if not (math.isfinite(self.step_rise) and self.step_rise > 0 and math.isfinite(self.damping)
                and self.damping >= 0):
            raise InputError(f"step_rise must be > 0 and damping >= 0, got {self.step_rise} and {self.damping}.")
        defaults = {f.name: f.default for f in fields(self)}
        if self.fit == "gradient":
            moved = [k for k in STEP_FIELDS if getattr(self, k) != defaults[k]]
            if moved:
                logging.getLogger(__name__).warning(
                    "%s set the optimizer steps of fit='steps' and are not read by the gradient mirror (the default "
                    "fit); pass --fit steps to use them.", ", ".join(f"--{k.replace('_', '-')}" for k in moved))
        else:
            moved = [k for k in GRADIENT_FIELDS[1:] if getattr(self, k) != defaults[k]]
            if moved:
                logging.getLogger(__name__).warning(
                    "%s shape the gradient mirror's step and are not read by fit='steps'; drop --fit steps to use "
                    "them.", ", ".join(f"--{k.replace('_', '-')}" for k in moved))

    @property
    def sign(self) -> float:
        """+1 when a supporting document's loss rises under the mirror (unlearn), -1 when it falls."""
        return 1.0 if self.direction == "unlearn" else -1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The settings that decide the fitted adapters (``fit_batch`` only changes how fast they are fitted).

        Only the settings of the chosen ``fit`` count; ``target_rise`` is left out while it is off (None), so runs
        recorded before these fields existed keep their keys."""
        unused = {"fit_batch", *(GRADIENT_FIELDS if self.fit == "steps" else STEP_FIELDS)}
        if self.precondition == "none":
            unused |= {"damping", "curvature_docs"}
        return {k: v for k, v in asdict(self).items()
                if k not in unused and not (k == "target_rise" and v is None)}



@dataclass(kw_only=True)
class WindowConfig:
    """How documents are cut into windows and batched (``ScanConfig.windows``).

    ``max_length``: tokens per window (default: the model's context, at most 1024); longer documents are split into
    windows that repeat ``overlap`` tokens of context (default ``max_length // 8``). ``sort_batches`` pools that many
    batches of windows and batches them by length, which cuts padding on corpora of mixed lengths (1 = off).
    ``fixed_width`` pads every batch to ``max_length`` so that scores do not depend on how documents are batched or
    split over processes, down to the last bit (costs compute on short documents).
    """

    max_length: int | None = option(None, min=2, help="tokens per window (default: the model's context, <= 1024)")
    overlap: int | None = option(None, min=1, help="context tokens repeated between windows (default: max_length // 8)")
    batch_size: int = option(8, min=1, help="windows per forward pass")
    fixed_width: bool = option(False, help="pad every batch to max_length: scores independent of batching and "
                               "process count, down to the last bit")
    sort_batches: int = option(16, min=1, help="pool this many batches of windows and batch them by length "
                               "(less padding; 1 = off)")

    def __post_init__(self) -> None:
        if self.max_length is not None and self.overlap is not None and self.overlap >= self.max_length:
            raise InputError(f"--overlap ({self.overlap}) must be smaller than --max-length ({self.max_length}).")


@dataclass(kw_only=True)
class ScoringConfig:
    """How the mirrors are read and a document's token-loss deltas become its score (``ScanConfig.scoring``).

    ``normalize="none"`` (the default, chosen by the sweep in docs/benchmarks.md) reports the raw token-loss
    delta, aggregated over the document's tokens by ``aggregate`` ("mean", "sum" or "max").
    ``normalize="zscore"`` standardises each document's scores across the probes of the run, which removes
    the drift that any perturbation causes on generic documents; when there are fewer than ``min_pool``
    probes, control probes cut from corpus snippets are added to the pool (``controls`` sets their number
    explicitly). ``normalize="loo"`` compares each probe with the others only (no sqrt(n - 1) ceiling). ``read``
    chooses how the scan reads the mirrors (a forward pass per mirror, or the linear read); under the linear read (and
    ``normalize="none"``) each probe's ``exact_head`` documents with the largest first-order change are read again
    exactly at the merge (the mixed read). ``max_new_tokens`` is how many tokens are generated for probes without a
    completion.
    """

    normalize: Literal["none", "zscore", "loo"] = option(
        "none", help="none (chosen by the sweep): the mean token-loss delta; zscore: standardise each document's "
        "scores across the probes (and controls); loo: against the other probes only", changes_result=True)
    controls: int | None = option(None, min=0, help="control probes from corpus snippets (default: enough to pool "
                                  "min_pool probes under zscore/loo)", changes_result=True)
    min_pool: int = option(8, min=1, help="probes + controls a normalised run pools at least", changes_result=True)
    max_new_tokens: int = option(32, min=1, help="tokens generated for probes without a completion",
                                 changes_result=True)
    aggregate: Literal["mean", "sum", "max"] = option("mean", help="how a document's token-loss deltas make its score",
                                                      changes_result=True)
    read: Literal["auto", "forward", "linear"] = option(
        "auto", help="how the scan reads the mirrors: forward, a forward pass per mirror (the loss change, "
        "exactly); linear, one forward and backward pass per batch for every mirror (the first-order change, "
        "hf_mirror.linear_read; the gradient mirror only); auto: linear for the gradient mirror, else forward",
        changes_result=True)
    exact_head: int = option(
        10, min=0, flag={"metavar": "N"},
        help="under the linear read, each probe's N documents with the largest first-order loss change (by "
        "magnitude) are read again exactly, by forward passes under its mirror (0: the first-order value everywhere; "
        "docstrings LDS 0.713 -> 0.762 at 10, docs/benchmarks_tail_patch.md); ignored by the forward read and under "
        "--normalize zscore/loo (which would need every control read again)", changes_result=True)

    def n_controls(self, n_probes: int) -> int:
        if self.controls is not None:
            return self.controls
        return max(0, self.min_pool - n_probes) if self.normalize != "none" else 0


@dataclass(kw_only=True)
class RetrievalConfig:
    """Which documents the mirror scans: each probe's retrieved candidates, or all (``ScanConfig.retrieval``).

    ``candidates=M`` scans only the union of each probe's top-M BM25 documents (retrieve-then-rerank); other documents
    get no score. ``index`` reuses the BM25 index that ``hf-mirror index`` saved for the corpus
    (:class:`hf_mirror.retrieval.CandidateIndex`): the same candidates, without indexing the corpus again.
    ``retrievers=["bm25", "dense"]`` makes each probe's candidates the union of its top-M BM25 documents and its
    top-M by cosine similarity in the index's dense vectors (``hf-mirror index --dense``; needs ``index``).
    """

    candidates: int | str | None = option(
        "auto", flag={"type": parse_candidates, "metavar": "auto|all|bm25:M"},
        help=f"bm25:M: the mirror scans only each probe's top-M BM25 documents (retrieve-then-rerank); all: every "
        f"document; auto: all up to {FULL_SCAN_MAX:,} documents ({LINEAR_FULL_SCAN_MAX:,} under the linear read), "
        f"bm25:{AUTO_CANDIDATES} above", changes_result=True)
    index: str | None = option(
        None, help="a directory built by `hf-mirror index` for this corpus and tokenizer: its saved BM25 index gives "
        "the candidates (the same ones) instead of indexing the corpus on the fly (default: on the fly)")
    retrievers: list[Literal["bm25", "dense"]] = option(
        default_factory=lambda: ["bm25"],
        help="each probe's candidates: bm25, its top-M BM25 documents; bm25 dense, their union with its top-M by "
        "cosine similarity of the model's mean-pooled embeddings (needs --index DIR built with `hf-mirror index "
        "--dense`); the default stays bm25 (docs/benchmarks_index.md)",
        changes_result=True, keyed_at_default=False)  # left out at bm25 alone: BM25-only runs keep their identity

    def __post_init__(self) -> None:
        self.candidates = parse_candidates(self.candidates)
        self.retrievers = parse_retrievers(self.retrievers)
        if self.index is not None:
            self.index = str(self.index)  # a Path from Python: config.json records it as text
        if "dense" in self.retrievers and self.index is None:
            raise InputError("--retrievers dense needs --index DIR, a saved index with dense vectors: build it with "
                             "`hf-mirror index --dense --model MODEL --corpus CORPUS --output DIR`.")

    @property
    def n_candidates(self) -> int:
        """BM25 candidates kept per probe: the rerank's M, else :data:`AUTO_CANDIDATES` (reported beside the mirror)."""
        return self.candidates if isinstance(self.candidates, int) else AUTO_CANDIDATES

    def candidates_only(self, n_documents: int, read: str = "forward") -> bool:
        """Whether the mirror scans only the candidates of a corpus of ``n_documents`` (else every document), when the
        scan reads the mirrors by ``read`` ("forward" or "linear")."""
        if self.candidates == "auto":
            return n_documents > (LINEAR_FULL_SCAN_MAX if read == "linear" else FULL_SCAN_MAX)
        return self.candidates is not None


@dataclass(kw_only=True)
class RankingConfig:
    """How each probe's documents are ranked and how many are kept (``ScanConfig.ranking``; :mod:`hf_mirror.fusion`).

    ``rank_by="hybrid"`` ranks each probe's BM25 candidates by BM25 plus ``mirror_weight`` x the mirror's z-scored
    influence; ``"mirror"`` every scanned document by the mirror alone. ``lexical_weight`` sets the influence column
    (``influence`` in the results, the additive estimate a linear datamodel sums):
    ``mirror / sd + lexical_weight * bm25 / sd`` over the probe's scored documents.
    """

    top_k: int = option(10, min=1, help="documents kept per probe, with token evidence", changes_result=True)
    rank_by: Literal["hybrid", "mirror"] = option(
        "hybrid", help="hybrid: each probe's BM25 candidates, ranked by BM25 plus --mirror-weight x the mirror's "
        "z-scored influence (hf_mirror.fusion), with the mirror and influence columns beside them; mirror: every "
        "scanned document by the mirror alone", changes_result=True)
    mirror_weight: float = option(
        MIRROR_WEIGHT, min=0, help="hybrid: weight of the mirror's z-scored influence against the BM25 score scaled to "
        "[0, 1] (0: BM25's order; chosen by the hybrid benchmark, docs/benchmarks_hybrid.md)", changes_result=True)
    lexical_weight: float = option(
        LEXICAL_WEIGHT, min=0, help="weight of BM25's prior in the influence column (each term scaled per probe; "
        "0, the default: the mirror's scores alone; chosen on tail-patch and LDS, docs/benchmarks_tail_patch.md)",
        changes_result=True, keyed_at_default=False)  # left out at 0: runs recorded before it keep their identity


@dataclass(kw_only=True)
class SpeedConfig:
    """Settings that change how fast a scan runs, never its scores (``ScanConfig.speed``).

    ``cache`` reuses base losses across runs (``cache_dir``, default ``$HF_MIRROR_CACHE``); ``shared_trunk``
    runs the blocks below the mirror's lowest adapted layer once per batch when ``MirrorConfig.layers`` is set;
    ``adapters_per_forward`` > 1 scores that many probes per forward pass (stacked LoRA weights and batched matmuls;
    PEFT mixed-adapter batches for adapter types the stacks lack); 0 (the default) as many as keep a pass's logits
    within 2^22 entries (:meth:`hf_mirror.scan.Scanner.auto_group`). ``precision`` ("bf16"/"fp16") autocasts on GPU.
    """

    cache: bool = option(True, help="read and write the base-loss cache")
    cache_dir: str | None = option(None, help="base-loss cache root (default: $HF_MIRROR_CACHE or ~/.cache/hf_mirror)")
    precision: Literal["no", "bf16", "fp16"] = option("no", help="autocast on GPU (the CPU scans in fp32)")
    shared_trunk: bool = option(True, help="run the blocks below the mirrors' layers once per batch")
    adapters_per_forward: int = option(0, min=0, help="probes scored per forward pass (stacked LoRA); 0: as many as "
                                       "keep a pass's logits within 2^22 entries (1 for gpt2-small)")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When a scan writes its checkpoints, every ``every`` documents or ``seconds`` (``ScanConfig.checkpoints``)."""

    checkpoint_every: int = option(1000, min=1, help="documents between checkpoints")
    checkpoint_seconds: float = option(300.0, min=1, help="seconds between checkpoints")


@dataclass(kw_only=True)
class ScanConfig:
    """How the corpus is scanned and scored, in groups by concern: ``windows`` (:class:`WindowConfig`), ``scoring``
    (:class:`ScoringConfig`), ``retrieval`` (:class:`RetrievalConfig`), ``ranking`` (:class:`RankingConfig`),
    ``speed`` (:class:`SpeedConfig`) and ``checkpoints`` (:class:`CheckpointConfig`).

    ``ScanConfig(ranking=RankingConfig(top_k=5), windows=WindowConfig(max_length=64))``; from flat field names (the
    flags' and config.json's): ``nested_config(ScanConfig, {"top_k": 5, "max_length": 64})``, and back:
    ``flat_config(scan)`` (:mod:`hf_mirror.flags`). Flat names are unique across the groups; each has a flag.
    """

    windows: WindowConfig = field(default_factory=WindowConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __getattr__(self, name: str):  # only for names no attribute has: a flat name says where it moved
        group = _SCAN_GROUP.get(name)
        if group is not None:
            raise AttributeError(f"ScanConfig.{name} is ScanConfig.{group}.{name} (the settings are grouped)")
        raise AttributeError(f"'ScanConfig' object has no attribute {name!r}")


# flat name (and method) -> its group
_SCAN_GROUP = {**{name: path[0] for name, (path, _, _) in flat_fields(ScanConfig).items()},
               "n_controls": "scoring", "n_candidates": "retrieval", "candidates_only": "retrieval"}
_GROUP_CLASS = {f.name: f.type for f in fields(ScanConfig)}
_scan_init = ScanConfig.__init__


@functools.wraps(_scan_init)  # its signature stays the dataclass's
def _grouped_init(self, **settings) -> None:
    """The dataclass's ``__init__``, with a flat setting (``ScanConfig(top_k=5)``) refused by naming its group."""
    flat = [name for name in settings if name in _SCAN_GROUP and name not in _GROUP_CLASS]
    if flat:
        fix = ", ".join(f"{_SCAN_GROUP[n]}={_GROUP_CLASS[_SCAN_GROUP[n]]}({n}=...)" for n in flat)
        raise TypeError(f"ScanConfig takes its settings in groups: {fix}; or from flat names, "
                        f"hf_mirror.flags.nested_config(ScanConfig, {{{', '.join(f'{n!r}: ...' for n in flat)}}}).")
    _scan_init(self, **settings)


ScanConfig.__init__ = _grouped_init  # type: ignore[method-assign]
