"""The pipeline: probes -> mirrors -> scan -> scores -> AttributionResult."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset, IterableDataset

from hf_mirror.cache import BaseLossCache, default_cache_dir, model_fingerprint, tokenizer_fingerprint
from hf_mirror.candidates import retrieve
from hf_mirror.config import PRECISIONS, MirrorConfig, ScanConfig
from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError, StateError
from hf_mirror.mirror import (
    FitReport,
    adapter_states,
    attach_mirrors,
    fit_mirrors,
    load_mirrors,
    save_mirrors,
)
from hf_mirror.modeling import context_length, resolve_model
from hf_mirror.probes import Probe, adapter_name, control_probes, generate_completions, load_probes, save_probes
from hf_mirror.progress import ScanProgress
from hf_mirror.results import AttributionResult
from hf_mirror.scan import Scanner
from hf_mirror.scoring import ScoreBook, merge_shards
from hf_mirror.trunk import SharedTrunk

logger = get_logger(__name__)  # accelerate's: logs once, from the main process, unless told otherwise

PACKAGES = ("hf-mirror", "torch", "transformers", "datasets", "accelerate", "peft", "evaluate")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _as_corpus(corpus) -> Corpus:
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, (str, Path, Dataset, IterableDataset, list, tuple)):
        return Corpus(corpus)
    raise InputError(f"Cannot use a {type(corpus).__name__} as a corpus; pass a path, a Hub name or a Dataset.")


def _run_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attribute(
    model,
    corpus,
    probes,
    *,
    tokenizer=None,
    mirror: MirrorConfig | None = None,
    scan: ScanConfig | None = None,
    output_dir: str | Path | None = None,
    model_kwargs: dict | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
    method: str = "mirror",
    **options,
) -> AttributionResult:
    """Attribute each probe's generation to the corpus documents it is most supported by.

    ``model`` is a ``from_pretrained`` name/path or a loaded causal LM (then pass ``tokenizer``);
    ``corpus`` a :class:`Corpus`, path, Hub name or ``Dataset``; ``probes`` a JSON-lines path or a list of
    ``Probe``/dicts. Probes without a completion get the model's greedy generation. Everything the run
    produces is written to ``output_dir`` (a temporary directory if not given).

    Under ``accelerate launch`` / ``torchrun`` each process scans its share of the corpus; the main process
    fits the mirrors once and merges the shards, so the answer does not depend on the number of processes.
    Rerunning on the same ``output_dir`` resumes from the last checkpoint (``overwrite=True`` starts afresh).

    ``method`` picks another method of the registry (:mod:`hf_mirror.methods`: ``bm25``, ``embedding``,
    ``gradsim``, ``ekfac``) on the same inputs, with ``scan``'s top_k/max_length/overlap/max_new_tokens and
    ``options`` for its scorer; the result has the same form.
    """
    if method != "mirror":
        from hf_mirror.baselines import attribute_baseline

        scan = scan or ScanConfig()
        return attribute_baseline(method, model, corpus, probes, tokenizer=tokenizer, output_dir=output_dir,
                                  top_k=scan.top_k, show_progress=show_progress, max_length=scan.max_length,
                                  overlap=scan.overlap, max_new_tokens=scan.max_new_tokens, model_kwargs=model_kwargs,
                                  **options)
    if options:
        raise InputError(f"Unknown option(s) {sorted(options)} for the mirror: its settings are MirrorConfig and "
                         "ScanConfig.")
    mirror = mirror or MirrorConfig()
    scan = scan or ScanConfig()
    corpus = _as_corpus(corpus)
    if scan.precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {scan.precision!r}.")
    on_gpu = torch.cuda.is_available()
    precision = scan.precision if on_gpu else "no"
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision)
    if scan.precision != "no" and not on_gpu:
        logger.warning("No GPU: scanning in fp32 (--precision %s applies on GPU only).", scan.precision)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if output_dir is None:
        if world > 1:
            raise InputError("Pass an output directory when running on several processes.")
        output_dir = tempfile.mkdtemp(prefix="hf_mirror_")
    out = Path(output_dir)
    if main:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, model_name = resolve_model(model, tokenizer, model_kwargs)
    model.to(accelerator.device).eval()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}  # PEFT freezes them: restored

    max_length = scan.max_length or context_length(model, tokenizer)
    overlap = scan.overlap if scan.overlap is not None else max(1, max_length // 8)
    if not 1 <= overlap < max_length:
        raise InputError(f"overlap must be between 1 and max_length - 1 ({max_length - 1}), got {overlap}.")

    # 1. probes, controls and each probe's BM25 candidates: made once on the main process, shared with the others
    if main:
        probe_list: list[Probe] = _probes_from_disk(out, probes) or load_probes(probes)
        probe_list = generate_completions(model, tokenizer, probe_list, scan.max_new_tokens)
        n_controls = scan.n_controls(len(probe_list))
        controls = (control_probes(corpus.documents(), tokenizer, n_controls, mirror.seed,
                                   span=min(16, (max_length - 1) // 2), strict=scan.controls is not None)
                    if n_controls else [])
        shared = [probe_list, controls, retrieve(corpus.documents(), probe_list, scan.n_candidates)]
    else:
        shared = [None, None, None]
    probe_list, controls, retrieval = broadcast_object_list(shared, from_process=0) if world > 1 else shared
    keep = retrieval.union() if scan.candidates_only(retrieval.n_documents) else None  # None: every document
    cache = (_base_cache(model, tokenizer, corpus, scan, max_length, overlap, precision, rank, world)
             if keep is None else None)  # the cache holds whole-corpus base losses
    n_controls = len(controls)
    normalize = scan.normalize
    if normalize != "none" and scan.controls is None and len(probe_list) + n_controls < 3:
        logger.warning("Too few probes and corpus snippets to z-score; reporting raw score deltas instead.")
        normalize = "none"
    pool = probe_list + controls
    taken: set[str] = set()
    names = [adapter_name(p.id, taken) for p in pool]
    ids = [p.id for p in pool]
    run_key = _run_key(str(model_name), corpus.describe(), mirror.identity(), [asdict(p) for p in pool],
                       normalize, scan.top_k, max_length, overlap, world,
                       None if keep is None else scan.n_candidates, scan.aggregate)
    shard = out / "shards" / f"rank-{rank:05d}-of-{world:05d}"
    # before the (costly) fit: checks the scoring options, refuses another run's shard, or resumes this one's
    book = ScoreBook(ids, mirror.sign, normalize, scan.top_k, shard, n_controls, run_key,
                     scan.checkpoint_every, scan.checkpoint_seconds, scan.aggregate)
    # control probes' scores are cached like base losses: with a hit they are neither fitted nor scanned
    control_cache = (BaseLossCache(cache.dir.parents[2], _run_key("control-scores-v1", cache.key, mirror.identity(),
                                                                   [asdict(c) for c in controls], scan.aggregate),
                                   rank, world, kind="control_scores")
                     if cache is not None and controls and normalize != "none" else None)
    controls_cached = control_cache is not None and control_cache.complete
    if world > 1:  # every process must scan the same adapters
        controls_cached = all(gather_object([controls_cached]))
    n_fit = len(probe_list) if controls_cached else len(pool)

    # 2. mirrors: fitted (or reloaded) once on the main process, broadcast to the others
    if main:
        peft_model, report = _fit_or_reload(model, tokenizer, pool[:n_fit], names[:n_fit], mirror, max_length, out,
                                            f"{run_key}-{n_fit}", show_progress)
        shared = [adapter_states(peft_model, names[:n_fit]) if world > 1 else None, report]
    else:
        shared = [None, None]
    states, report = broadcast_object_list(shared, from_process=0) if world > 1 else shared
    if not main:
        peft_model = attach_mirrors(model, names[:n_fit], mirror, states)

    # 3. scan this process's shard, checkpointing as it goes
    try:
        if not book.done:
            peers = [out / "shards" / f"rank-{r:05d}-of-{world:05d}" / "progress.json" for r in range(1, world)]
            progress = ScanProgress(shard / "progress.json" if not main else None, peers if main else [],
                                    corpus.num_documents(), show_progress and main)
            layers = mirror.block_indices(model)
            first = min(layers) if layers else 0
            trunk = SharedTrunk(peft_model, first) if scan.shared_trunk and first > 0 else None
            scanner = Scanner(peft_model, tokenizer, names[:n_fit], ids[:n_fit], max_length, overlap, scan.batch_size,
                              progress,
                              autocast=accelerator.autocast, trunk=trunk,
                              adapters_per_forward=scan.adapters_per_forward, fixed_width=scan.fixed_width,
                              sort_batches=scan.sort_batches)
            docs = corpus.documents(rank, world)
            if keep is not None:  # retrieve-then-rerank: only the candidates
                docs = (d for d in docs if d[0] in keep)
            docs = itertools.islice(docs, book.next_seq, None)
            cached = cache.read(book.next_seq) if cache is not None and cache.complete else None
            fill_cache = cache is not None and cached is None and book.next_seq == 0
            control_rows = control_cache.read(book.next_seq) if controls_cached else None
            fill_controls = control_cache is not None and not controls_cached and book.next_seq == 0
            try:
                for doc in scanner(docs, start=book.next_seq, base_losses=cached):
                    if fill_cache:
                        cache.add(doc.seq, doc.doc_id, doc.base)
                    raw = book.add(doc, scanner.skipped, _control_row(control_rows, doc) if controls_cached else None)
                    if fill_controls:
                        control_cache.add(doc.seq, doc.doc_id, raw[len(probe_list):])
            except Exception:
                logger.error("Process %d of %d failed while scanning document %r (#%d of its shard); finished "
                             "work is checkpointed in %s: rerun the same command to resume.",
                             rank, world, scanner.current_doc_id, scanner.next_seq - 1, shard, main_process_only=False)
                for c in (cache if fill_cache else None, control_cache if fill_controls else None):
                    if c is not None:
                        c.discard()
                raise
            if fill_cache:
                cache.commit(scanner.n_documents)
            if fill_controls:
                control_cache.commit(scanner.n_documents)
            book.finish(scanner.next_seq, scanner.skipped, tokenizer,
                        {"base_passes": scanner.base_passes, "base_cache_hits": int(cached is not None),
                         "control_cache_hits": int(controls_cached), "forward_passes": scanner.forward_passes,
                         "window_tokens": scanner.window_tokens, "padded_tokens": scanner.padded_tokens})
            logger.info("Process %d: %d documents, %d base-model passes (%s).", rank, scanner.n_documents,
                        scanner.base_passes, "base losses from cache" if cached is not None else "no cache hit",
                        main_process_only=False)
    finally:
        peft_model.unload()  # give the caller back their model without LoRA layers, as trainable as it was
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
    accelerator.wait_for_everyone()

    # 4. merge on the main process
    if main:
        shards = sorted((out / "shards").glob(f"rank-*-of-{world:05d}"))
        merged = merge_shards(shards, out, ids[: len(probe_list)], scan.top_k, retrieval.scores)
        records = [
            {**asdict(p), "adapter": n, "probe_loss_before": report.loss_before[p.id],
             "probe_loss_after": report.loss_after[p.id]}
            for p, n in zip(probe_list, names, strict=False)
        ]
        config = {
            "model": str(model_name),
            "model_kwargs": {k: str(v) for k, v in (model_kwargs or {}).items()},
            "corpus": corpus.describe(),
            "mirror": mirror.to_dict(),
            "scan": {**asdict(scan), "max_length": max_length, "overlap": overlap, "controls": n_controls,
                     "normalize": normalize},
            "control_probes": [asdict(c) for c in controls],
            "candidate_documents": None if keep is None else len(keep),
            "retrieval": {"method": "bm25", "per_probe": scan.n_candidates, "documents": retrieval.n_documents},
            "device": str(accelerator.device),
            "num_processes": world,
            "run_key": run_key,
            "versions": package_versions(),
            "torch_dtype": str(next(model.parameters()).dtype),
            "stats": merged["stats"],
        }
        AttributionResult(out, merged["topk"], merged["evidence"], records, merged["skipped"], config).save(out)
    accelerator.wait_for_everyone()
    return AttributionResult.load(out)


def _base_cache(model, tokenizer, corpus: Corpus, scan: ScanConfig, max_length: int, overlap: int,
                precision: str, rank: int, world: int) -> BaseLossCache | None:
    """The base-loss cache for this model, tokenizer, corpus and windowing (None when it cannot be keyed)."""
    fingerprint = corpus.fingerprint() if scan.cache else None
    if fingerprint is None:
        if scan.cache:
            logger.info("Corpus has no stable fingerprint (a generator?): base losses are not cached.")
        return None
    key = _run_key("base-losses-v1", model_fingerprint(model), tokenizer_fingerprint(tokenizer), fingerprint,
                   corpus.text_column, corpus.id_column, max_length, overlap, precision, scan.fixed_width,
                   str(next(model.parameters()).dtype))
    return BaseLossCache(scan.cache_dir or default_cache_dir(), key, rank, world)


def _control_row(rows, doc) -> np.ndarray:
    """The cached control scores of ``doc`` (the cache holds the same documents in the same order)."""
    row = next(rows, None)
    if row is None or row[0] != doc.seq or row[1] != str(doc.doc_id):
        raise StateError(f"The control-score cache does not match the corpus at document {doc.doc_id!r}; delete "
                         "the cache directory (--cache-dir / $HF_MIRROR_CACHE) or run with --no-cache.")
    return row[2]


def _probes_from_disk(out: Path, probes) -> list[Probe] | None:
    """On resume, reuse the probes (with their generated completions) that the interrupted run fitted."""
    path = out / "adapters" / "probes.jsonl"
    if not path.exists():
        return None
    saved = load_probes(path)
    given = load_probes(probes)
    if [(p.id, p.prompt) for p in given] != [(p.id, p.prompt) for p in saved] or any(
        g.completion is not None and g.completion != s.completion for g, s in zip(given, saved, strict=True)
    ):
        return None
    return saved


def _fit_or_reload(model, tokenizer, pool, names, mirror, max_length, out: Path, run_key: str, show_progress):
    """Fit the mirrors, or reload them when this output directory already holds this run's intact adapters.

    ``fit.json`` keeps each adapter file's checksum: damaged adapters (or a damaged ``fit.json``) are refitted.
    """
    from hf_mirror.integrity import atomic_write, damaged, expect, hash_files, read_json
    from hf_mirror.mirror import check_mirrors, mirror_files

    adapters = out / "adapters"
    marker = adapters / "fit.json"
    if marker.exists():
        try:
            fit = read_json(marker)
            expect(isinstance(fit, dict) and isinstance(fit.get("run_key"), str), "fit.json: schema")
            reuse = fit["run_key"] == run_key
            if reuse:
                ids = {p.id for p in pool}
                expect(all(isinstance(fit.get(k), dict) and ids <= set(fit[k]) for k in ("loss_before", "loss_after")),
                       "fit.json: probe losses")
                check_mirrors(adapters, names, fit.get("sha256"))
        except (ValueError, OSError) as e:
            logger.warning("The mirrors in %s are damaged (%s); fitting them again.", adapters, e)
            reuse = False
        if reuse:
            try:
                return load_mirrors(model, adapters, names), FitReport(fit["loss_before"], fit["loss_after"])
            except Exception as e:  # intact files that still do not load: refuse rather than guess
                raise damaged(adapters, e) from e
    elif any((adapters / n).exists() for n in names):
        logger.warning("%s is missing (a damaged or interrupted fit); fitting the mirrors again.", marker)
    peft_model, report = fit_mirrors(model, tokenizer, pool, names, mirror, max_length, show_progress)
    save_mirrors(peft_model, names, adapters)
    save_probes(pool, adapters / "probes.jsonl")
    fit = {"run_key": run_key, "loss_before": report.loss_before, "loss_after": report.loss_after,
           "sha256": hash_files(adapters, mirror_files(adapters, names))}
    atomic_write(marker, json.dumps(fit).encode())
    return peft_model, report
