"""The pipeline: probes -> mirrors -> scan -> scores -> AttributionResult."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object

from hf_mirror import methods
from hf_mirror.cache import BaseLossCache, default_cache_dir, model_fingerprint, tokenizer_fingerprint
from hf_mirror.config import PRECISIONS, MirrorConfig, ScanConfig, flat_config, result_settings
from hf_mirror.corpus import Corpus, as_corpus
from hf_mirror.distributed import on_gpu
from hf_mirror.errors import InputError, StateError
from hf_mirror.fusion import Ranking
from hf_mirror.linear_read import LinearRead
from hf_mirror.merge import exact_head, merge_shards
from hf_mirror.methods import Method, Request
from hf_mirror.mirror import (
    FitReport,
    adapter_states,
    attach_mirrors,
    block_indices,
    fit_mirrors,
    load_mirrors,
    save_mirrors,
)
from hf_mirror.modeling import context_length, resolve_model, window_length
from hf_mirror.ownership import Output, check_output_path, writable
from hf_mirror.probes import (
    Probe,
    adapter_name,
    check_probe_lengths,
    control_probes,
    generate_completions,
    load_probes,
    save_probes,
)
from hf_mirror.progress import ScanProgress
from hf_mirror.regime import probe_stats, warnings_for
from hf_mirror.report import write_report
from hf_mirror.results import AttributionResult
from hf_mirror.retrieval import CandidateIndex, Candidates, retrieve
from hf_mirror.runs import run_identity, run_record, stable_key
from hf_mirror.scan import ScannedDoc, Scanner
from hf_mirror.scoring import EVIDENCE_COLUMNS, ScoreBook, token_pieces
from hf_mirror.trunk import SharedTrunk

logger = get_logger(__name__)  # accelerate's: logs once, from the main process, unless told otherwise


@dataclass(kw_only=True)
class _Run:
    """What the stages of one run share: the process group, the output directory, the model and the windowing.

    ``out`` is where the run writes (``output.work`` on the main process: a staging directory under overwrite);
    ``final`` where its result lands. ``probes`` are the given probes, validated (main process only).
    """

    accelerator: Accelerator
    out: Path
    final: Path
    model: object
    tokenizer: object
    model_name: str
    model_fingerprint: str
    corpus: Corpus
    mirror: MirrorConfig
    scan: ScanConfig
    max_length: int
    overlap: int
    precision: str
    show_progress: bool
    probes: list[Probe] | None
    output: Output | None  # the main process's lock and manifest
    read: str  # how the scan reads the mirrors: "forward" or "linear" (resolve_read)
    index: CandidateIndex | None = None  # the saved candidate index (ScanConfig.retrieval.index; main process)
    embedder: object | None = None  # the dense retriever's query embedder (retrievers with dense; main process)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def shard(self) -> Path:
        return self.out / "shards" / f"rank-{self.rank:05d}-of-{self.world:05d}"

    def share(self, values: list) -> list:
        """``values`` of the main process, on every process."""
        return broadcast_object_list(values, from_process=0) if self.world > 1 else values


@dataclass(kw_only=True)
class _Pool:
    """The probes, the control probes that pool with them, and each probe's BM25 candidates."""

    probes: list[Probe]
    controls: list[Probe]
    retrieval: Candidates
    keep: set | None  # the documents the mirrors scan (None: every document)
    normalize: str
    names: list[str] = field(default_factory=list)  # adapter names

    def __post_init__(self) -> None:
        taken: set[str] = set()
        self.names = [adapter_name(p.id, taken) for p in self.all]

    @property
    def all(self) -> list[Probe]:
        return self.probes + self.controls

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.all]


@dataclass
class _Caches:
    """The base-loss cache and the control-score cache of this run (None where the run cannot use them)."""

    base: BaseLossCache | None
    controls: BaseLossCache | None
    controls_cached: bool  # every process has the control probes' scores: they are neither fitted nor scanned


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
    Rerunning on the same ``output_dir`` resumes from the last checkpoint. Every input is validated before
    anything is fitted or written. ``output_dir`` must be empty or hold hf-mirror's own files (its manifest
    ``hf_mirror.json`` names them); another run there (other method, model weights, corpus content, probes,
    process layout or settings) is refused unless ``overwrite=True``, which builds the new result beside the old
    one and swaps it in when finished, removing only the files the manifest names (:mod:`hf_mirror.ownership`).

    ``method`` picks another method of the registry (:mod:`hf_mirror.methods`: ``bm25``, ``embedding``,
    ``gradsim``, ``ekfac``, ...) on the same inputs, with ``scan``'s top_k/max_length/overlap/max_new_tokens and
    ``options`` for its scorer; the result has the same form. What a method does not support (several processes,
    resuming, token evidence: :class:`hf_mirror.methods.Method`) is refused, naming the alternative.
    """
    request = Request(model=model, corpus=corpus, probes=probes, tokenizer=tokenizer, mirror=mirror,
                      scan=scan or ScanConfig(), output_dir=output_dir, model_kwargs=model_kwargs,
                      show_progress=show_progress, overwrite=overwrite, options=options)
    return methods.run(method, request)


class Mirror(Method):
    """The mirror (this toolkit's method) under the method contract: it needs the model and its gradients (the
    fit), scans one shard of the corpus per process, resumes from its checkpoints and keeps token evidence."""

    name = "mirror"
    needs_model = True
    needs_grad = True
    multi_process = True
    resumes = True
    token_evidence = True

    @classmethod
    def attribute(cls, request: Request) -> AttributionResult:
        if request.options:
            raise InputError(f"Unknown option(s) {sorted(request.options)} for the mirror: its settings are "
                             "MirrorConfig and ScanConfig.")
        return _attribute_mirror(request)


def _attribute_mirror(request: Request) -> AttributionResult:
    """The mirror's run: probes and candidates, the mirrors, the scan of this process's shard, the merge."""
    model_kwargs = request.model_kwargs
    run = _start(request.model, request.corpus, request.probes, request.tokenizer, request.mirror or MirrorConfig(),
                 request.scan or ScanConfig(), request.output_dir, model_kwargs, request.show_progress,
                 request.overwrite)
    try:
        pool = _probes_and_candidates(run)  # 1. probes, controls, BM25 candidates
        caches = _caches(run, pool)
        book = _score_book(run, pool)  # before the costly fit: refuses another run's shard, or resumes this one's
        with _mirrors_and_scan(run, pool, caches, book) as (report, peft_model):  # 2. fit or reload, 3. scan
            run.accelerator.wait_for_everyone()
            if run.main:
                _merge_and_record(run, pool, report, book, model_kwargs, peft_model)  # 4. merge, 5. record
                run.output.finish()  # under overwrite: swapped in for the previous result
        run.accelerator.wait_for_everyone()
    finally:
        if run.output is not None:
            run.output.release()  # the lock
    return AttributionResult.load(run.final)


@contextmanager
def _mirrors_and_scan(run: _Run, pool: _Pool, caches: _Caches, book: ScoreBook) -> Iterator[tuple[FitReport, object]]:
    """Fit or reload the mirrors (main process, shared), scan this process's shard unless it is finished, and yield
    the fit's report and the model with its mirrors (the report's evidence is read with them); on leaving, give the
    caller back their model without LoRA layers, as trainable as it was."""
    trainable = {name: p.requires_grad for name, p in run.model.named_parameters()}  # PEFT freezes them
    n_fit = len(pool.probes) if caches.controls_cached else len(pool.all)
    peft_model = None
    try:
        peft_model, report = _mirrors(run, pool, n_fit)
        if not book.done:
            _scan(run, pool, caches, book, peft_model, n_fit)
        yield report, peft_model
    finally:  # also when a fit fails (a non-finite probe loss): the caller's model comes back as it was
        if peft_model is not None:
            peft_model.unload()
        for name, p in run.model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))


def _start(model, corpus, probes, tokenizer, mirror: MirrorConfig, scan: ScanConfig, output_dir, model_kwargs,
           show_progress: bool, overwrite: bool) -> _Run:
    """The process group, the validated inputs, the model on its device, the windowing and the owned output."""
    corpus = as_corpus(corpus)
    if scan.speed.precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {scan.speed.precision!r}.")
    gpu = on_gpu()
    precision = scan.speed.precision if gpu else "no"
    accelerator = Accelerator(cpu=not gpu, mixed_precision=precision)  # the process state of distributed.py
    if scan.speed.precision != "no" and not gpu:
        logger.warning("No GPU: scanning in fp32 (--precision %s applies on GPU only).", scan.speed.precision)
    read = resolve_read(mirror, scan)
    if precision != "no" and read == "forward" and mirror.fit == "gradient" and mirror.step_rise < 0.5:
        logger.warning("--precision %s rounds each token loss to about 1e-2 of itself, more than the %g-nat gradient "
                       "mirror moves it: scan in fp32 (--precision no) or raise --step-rise.", precision,
                       mirror.step_rise)
    if output_dir is None:
        if accelerator.num_processes > 1:
            raise InputError("Pass an output directory when running on several processes.")
        output_dir = tempfile.mkdtemp(prefix="hf_mirror_")
    final = Path(output_dir)
    main = accelerator.is_main_process
    if main:
        check_output_path(final)
    given = load_probes(probes) if main else None
    model, tokenizer, model_name = resolve_model(model, tokenizer, model_kwargs)
    model.to(accelerator.device).eval()
    max_length = window_length(model, tokenizer, scan.windows.max_length)
    overlap = scan.windows.overlap if scan.windows.overlap is not None else max(1, max_length // 8)
    if not 1 <= overlap < max_length:
        raise InputError(f"overlap must be between 1 and max_length - 1 ({max_length - 1}), got {overlap}.")
    if mirror.steps == 0:
        logger.warning("--steps 0: the mirrors are not fitted, so every mirror score is 0.")
    fingerprint = model_fingerprint(model)
    output = index = embedder = None
    if main:
        corpus.check()  # readable, UTF-8, columns, not empty: before anything is fitted or written
        if scan.retrieval.index is not None:  # refused here when it is half-written or for another corpus or tokenizer
            index = CandidateIndex.load(scan.retrieval.index, tokenizer, corpus)
            if "dense" in scan.retrieval.retrievers:  # refused here without dense vectors, or with another model's
                embedder = index.embedder(model, tokenizer)
        settings = {**mirror.identity(), **result_settings(scan), "max_length": max_length, "overlap": overlap}
        if read == "forward":  # exact already: the mixed read's setting does not reach its result (nor its identity)
            del settings["exact_head"]
        identity = run_identity("mirror", model_name, fingerprint, tokenizer, corpus, given,
                                accelerator.num_processes, settings)
        output = Output.open(final, identity, overwrite)
    work = [output.work if output is not None else None]
    try:
        if accelerator.num_processes > 1:  # every process writes where the main process chose
            work = broadcast_object_list(work, from_process=0)
    except BaseException:
        if output is not None:
            output.release()
        raise
    return _Run(accelerator=accelerator, out=Path(work[0]), final=final, model=model, tokenizer=tokenizer,
                model_name=str(model_name), model_fingerprint=fingerprint, corpus=corpus, mirror=mirror, scan=scan,
                max_length=max_length, overlap=overlap, precision=precision, show_progress=show_progress,
                probes=given, output=output, index=index, embedder=embedder, read=read)


def resolve_read(mirror: MirrorConfig, scan: ScanConfig) -> str:
    """How the scan reads the mirrors (``scan.scoring.read``, with ``auto`` decided): forward passes, or the
    first-order read of :mod:`hf_mirror.linear_read`, which needs the gradient mirror and a linear aggregate."""
    linear_ok = mirror.fit == "gradient" and scan.scoring.aggregate != "max"
    if scan.scoring.read == "auto":
        return "linear" if linear_ok else "forward"
    if scan.scoring.read == "linear" and not linear_ok:
        raise InputError("--read linear reads the gradient mirror's first-order loss change summed over each document: "
                         "it needs --fit gradient and --aggregate mean or sum; use --read forward (or auto) here.")
    return scan.scoring.read


def _retrieval_settings(scan: ScanConfig) -> dict:
    """``retrievers`` where it is not the default (BM25 alone), so BM25-only runs keep the identity they had."""
    return {} if scan.retrieval.retrievers == ["bm25"] else {"retrievers": scan.retrieval.retrievers}


def _probes_and_candidates(run: _Run) -> _Pool:
    """Probes (completions generated where missing), control probes and candidates (BM25, with the dense ones where
    asked), made on the main process and shared."""
    scan = run.scan
    shared = [None, None, None]
    if run.main:
        probe_list: list[Probe] = _probes_from_disk(run.out, run.probes) or run.probes
        probe_list = generate_completions(run.model, run.tokenizer, probe_list, scan.scoring.max_new_tokens,
                                          max_length=run.max_length)
        check_probe_lengths(run.tokenizer, probe_list, run.max_length, context_length(run.model, None, cap=1 << 62))
        n_controls = scan.scoring.n_controls(len(probe_list))
        controls = (control_probes(run.corpus.documents(), run.tokenizer, n_controls, run.mirror.seed,
                                   span=min(16, (run.max_length - 1) // 2), strict=scan.scoring.controls is not None)
                    if n_controls else [])

        def full_scan(n_documents: int) -> bool:  # a full scan keeps every document's BM25, for the influence
            return not scan.retrieval.candidates_only(n_documents, run.read)

        retrieval = (run.index.retrieve(probe_list, scan.retrieval.n_candidates, run.embedder, keep_all=full_scan)
                     if run.index is not None else
                     retrieve(run.corpus.documents(), probe_list, scan.retrieval.n_candidates, keep_all=full_scan))
        shared = [probe_list, controls, retrieval]
        if run.world > 1 and retrieval.every is not None:  # every document's BM25: read by the merge only (here)
            shared[2] = dataclasses.replace(retrieval, every=None)
    probe_list, controls, received = run.share(shared)
    retrieval = retrieval if run.main else received
    normalize = scan.scoring.normalize
    if normalize != "none" and scan.scoring.controls is None and len(probe_list) + len(controls) < 3:
        logger.warning("Too few probes and corpus snippets to z-score; reporting raw score deltas instead.")
        normalize = "none"
    keep = retrieval.union() if scan.retrieval.candidates_only(retrieval.n_documents, run.read) else None
    return _Pool(probes=probe_list, controls=controls, retrieval=retrieval, keep=keep, normalize=normalize)


def _caches(run: _Run, pool: _Pool) -> _Caches:
    """The base-loss cache (whole-corpus scans only) and, for normalised runs, the control probes' score cache."""
    base = (_base_cache(run.model, run.tokenizer, run.corpus, run.scan, run.max_length, run.overlap, run.precision,
                        run.rank, run.world, run.model_fingerprint) if pool.keep is None else None)
    controls = None
    if base is not None and pool.controls and pool.normalize != "none":
        key = stable_key("control-scores-v1", base.key, run.mirror.identity(), [asdict(c) for c in pool.controls],
                         run.scan.scoring.aggregate, *([] if run.read == "forward" else ["linear"]))
        controls = BaseLossCache(base.dir.parents[2], key, rank=run.rank, world=run.world, kind="control_scores")
    cached = controls is not None and controls.complete
    if run.world > 1:  # every process must scan the same adapters
        cached = all(gather_object([cached]))
    if controls is not None and not cached and not writable(base.dir.parents[2]):
        controls = None  # read-only: the control scores are computed, not stored
    return _Caches(base, controls, cached)


def _score_book(run: _Run, pool: _Pool) -> ScoreBook:
    """This process's score book, keyed by everything that decides the scores (a resume continues it)."""
    scan = run.scan
    ranking, retrieval, aggregate = scan.ranking, scan.retrieval, scan.scoring.aggregate
    hybrid = Ranking.from_config(scan).hybrid  # fusion.Ranking alone says what a rank_by ranks
    run_key = stable_key(run.model_name, run.model_fingerprint, run.corpus.describe(), run.corpus.fingerprint(),
                         run.mirror.identity(), [asdict(p) for p in pool.all],
                         pool.normalize, ranking.top_k, run.max_length, run.overlap, run.world,
                         None if pool.keep is None and not hybrid else retrieval.n_candidates, aggregate,
                         ranking.rank_by,
                         *_retrieval_settings(scan).values(),
                         *([] if run.read == "forward" else ["linear", _head(run, pool)]))
    # hybrid: each probe's top-k holds all its candidates (with their evidence); the merge ranks them. Else the exact
    # head's documents may leave the top-k at the merge: as many more are kept, so that what moves up is there
    eligible = {p: {str(d) for d in docs} for p, docs in pool.retrieval.scores.items()} if hybrid else None
    most = retrieval.n_candidates * len(retrieval.retrievers)  # a probe's candidates: each retriever's top-M, united
    top_k = max(ranking.top_k, most) if hybrid else ranking.top_k + _head(run, pool)
    return ScoreBook(pool.ids, sign=run.mirror.sign, normalize=pool.normalize, top_k=top_k, shard_dir=run.shard,
                     n_controls=len(pool.controls), run_key=run_key, checkpoint_every=scan.checkpoints.checkpoint_every,
                     checkpoint_seconds=scan.checkpoints.checkpoint_seconds, aggregate=aggregate, eligible=eligible)


def _head(run: _Run, pool: _Pool) -> int:
    """Each probe's documents the mixed read reads again exactly (``exact_head``): under the linear read without
    normalisation, else none (the forward read is exact; a normalised score would need every control read again)."""
    return run.scan.scoring.exact_head if run.read == "linear" and pool.normalize == "none" else 0


def _mirrors(run: _Run, pool: _Pool, n_fit: int):
    """The first ``n_fit`` mirrors of the pool, fitted (or reloaded) on the main process and attached everywhere."""
    names = pool.names[:n_fit]
    # the fit key holds only what decides the adapters: the model, the mirror settings, the probes, the windowing
    fit_key = stable_key(run.model_name, run.model_fingerprint, run.mirror.identity(),
                         [asdict(p) for p in pool.all[:n_fit]], run.max_length)
    shared = [None, None]
    if run.main:
        peft_model, report = _fit_or_reload(run.model, run.tokenizer, pool.all[:n_fit], names, run.mirror,
                                            run.max_length, run.out, fit_key, run.show_progress,
                                            lambda: _curvature(run))
        shared = [adapter_states(peft_model, names) if run.world > 1 else None, report]
    states, report = run.share(shared)
    if not run.main:
        peft_model = attach_mirrors(run.model, names, run.mirror, states)
    return peft_model, report


def _scan(run: _Run, pool: _Pool, caches: _Caches, book: ScoreBook, peft_model, n_fit: int) -> None:
    """Scan this process's share of the corpus (or of the candidates), checkpointing as it goes."""
    scan, main, world = run.scan, run.main, run.world
    peers = [run.out / "shards" / f"rank-{r:05d}-of-{world:05d}" / "progress.json" for r in range(1, world)]
    progress = ScanProgress(run.shard / "progress.json" if not main else None, peers if main else [],
                            total=run.corpus.num_documents(), show=run.show_progress and main)
    layers = block_indices(run.mirror, run.model)
    first = min(layers) if layers else 0
    read = run.read
    trunk = SharedTrunk(peft_model, first) if scan.speed.shared_trunk and first > 0 and read == "forward" else None
    scanner = Scanner(peft_model, run.tokenizer, adapter_names=pool.names[:n_fit], probe_ids=pool.ids[:n_fit],
                      max_length=run.max_length, overlap=run.overlap, batch_size=scan.windows.batch_size,
                      progress=progress, autocast=run.accelerator.autocast, trunk=trunk,
                      adapters_per_forward=scan.speed.adapters_per_forward, fixed_width=scan.windows.fixed_width,
                      sort_batches=scan.windows.sort_batches,
                      linear=LinearRead(peft_model, pool.names[:n_fit]) if read == "linear" else None)
    docs = run.corpus.documents(run.rank, world)
    if pool.keep is not None:  # retrieve-then-rerank: only the candidates
        docs = (d for d in docs if d[0] in pool.keep)
    docs = itertools.islice(docs, book.next_seq, None)
    base, controls, controls_cached = caches.base, caches.controls, caches.controls_cached
    cached = base.read(book.next_seq) if base is not None and base.complete else None
    fill_base = base is not None and cached is None and book.next_seq == 0
    control_rows = controls.read(book.next_seq) if controls_cached else None
    fill_controls = controls is not None and not controls_cached and book.next_seq == 0
    try:
        for doc in scanner(docs, start=book.next_seq, base_losses=cached):
            if fill_base:
                base.add(doc.seq, doc.doc_id, doc.base)
            raw = book.add(doc, scanner.skipped, _control_row(control_rows, doc) if controls_cached else None)
            if fill_controls:
                controls.add(doc.seq, doc.doc_id, raw[len(pool.probes):])
    except Exception:
        logger.error("Process %d of %d failed while scanning document %r (#%d of its shard); finished work is "
                     "checkpointed in %s: rerun the same command to resume.", run.rank, world,
                     scanner.current_doc_id, scanner.next_seq - 1, run.shard, main_process_only=False)
        for c in (base if fill_base else None, controls if fill_controls else None):
            if c is not None:
                c.discard()
        raise
    for c in (base if fill_base else None, controls if fill_controls else None):
        if c is not None:
            c.commit(scanner.n_documents)
    book.finish(scanner.next_seq, scanner.skipped, run.tokenizer,
                {"base_passes": scanner.base_passes, "base_cache_hits": int(cached is not None),
                 "control_cache_hits": int(controls_cached), "forward_passes": scanner.forward_passes,
                 "window_tokens": scanner.window_tokens, "padded_tokens": scanner.padded_tokens})
    logger.info("Process %d: %d documents, %d base-model batches (%s).", run.rank, scanner.n_documents,
                scanner.base_passes, "base losses from cache" if cached is not None else "no cache hit",
                main_process_only=False)


def _merge_and_record(run: _Run, pool: _Pool, report: FitReport, book: ScoreBook, model_kwargs: dict | None,
                      peft_model) -> None:
    """Merge every process's shard, with the mixed read's exact head, and write the result with the record of how it
    was made (main process)."""
    scan = run.scan
    shards = sorted((run.out / "shards").glob(f"rank-*-of-{run.world:05d}"))
    exact, reads = _exact_head(run, pool, book, shards, peft_model)
    merged = merge_shards(shards, run.out, pool.ids[: len(pool.probes)], scan.ranking.top_k, pool.retrieval.scores,
                          Ranking.from_config(scan), lexical=pool.retrieval.bm25, dense=pool.retrieval.dense,
                          exact=exact)
    records = [{**asdict(p), "adapter": n, "probe_loss_before": report.loss_before[p.id],
                "probe_loss_after": report.loss_after[p.id]} for p, n in zip(pool.probes, pool.names, strict=False)]
    own = {
        "mirror": run.mirror.to_dict(),
        "scan": {**flat_config(scan), "max_length": run.max_length, "overlap": run.overlap,
                 "controls": len(pool.controls), "normalize": pool.normalize},
        "control_probes": [asdict(c) for c in pool.controls],
        "candidate_documents": None if pool.keep is None else len(pool.keep),
        "retrieval": {"method": "+".join(scan.retrieval.retrievers), "retrievers": scan.retrieval.retrievers,
                      "per_probe": scan.retrieval.n_candidates, "documents": pool.retrieval.n_documents},
    }
    config = run_record(run.model_name, model_kwargs, run.corpus, own, device=str(run.accelerator.device),
                        num_processes=run.world, run_key=book.run_key,
                        torch_dtype=str(next(run.model.parameters()).dtype),
                        stats={**merged["stats"], "exact_head_pairs": len(reads)})
    stats = probe_stats(records, _raw_scores(run.out, [p.id for p in pool.probes]), run.mirror.direction)
    config["regime"] = {"probes": stats, "warnings": warnings_for(stats, config["mirror"],
                                                                 run.read)}
    for warning in config["regime"]["warnings"]:
        logger.warning(warning)
    result = AttributionResult(run.out, topk=merged["topk"], evidence=merged["evidence"], probes=records,
                               skipped=merged["skipped"], config=config)
    texts = _report_evidence(run, pool, result, peft_model, reads)
    result.save(run.out)
    write_report(result, run.out, texts=texts)


def _raw_scores(out: Path, probe_ids: list[str]) -> dict[str, np.ndarray]:
    """Each probe's raw score of every scanned document (from the merged ``scores.parquet``)."""
    import pyarrow.parquet as pq

    path = out / "scores.parquet"
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["probe_id", "raw_score"]).to_pandas()
    return {pid: rows.to_numpy(np.float64) for pid, rows in table.groupby("probe_id")["raw_score"]}


def _exact_head(run: _Run, pool: _Pool, book: ScoreBook, shards: list[Path], peft_model
                ) -> tuple[pd.DataFrame | None, dict[tuple[str, str], ScannedDoc]]:
    """The mixed read: each probe's :func:`_head` documents with the largest first-order change
    (:func:`hf_mirror.merge.exact_head`) read again by forward passes under its own mirror. Returns their exact scores,
    as the forward read's score book makes them, as :func:`merge_shards`'s ``exact`` rows (None: no head), and the
    documents read by (probe id, document id) (their token losses are the report's evidence)."""
    n = _head(run, pool)
    if not n:
        return None, {}
    head = exact_head(shards, n)
    known = {str(d): t for d, t in zip(head["doc_id"], head["text"], strict=True) if isinstance(t, str)}
    texts = _texts(run, set(head["doc_id"].astype(str)), known)
    need = {pid: list(docs) for pid, docs in head.groupby("probe_id", sort=False)["doc_id"]}
    reads = _read_exactly(run, pool, peft_model, need, texts)
    keys = [(p, str(d)) for p, d in zip(head["probe_id"], head["doc_id"], strict=True)]
    head = head.loc[[k in reads for k in keys]]
    raw = [float(book.read_scores(reads[k].base, reads[k].mirror)[0]) for k in keys if k in reads]
    logger.info("Mixed read: %d (probe, document) pairs read again exactly, each under its probe's mirror.",
                len(reads))
    # normalize "none" (_head): a document's score is its raw score
    return head.assign(raw_score=raw, score=raw, text=[texts[str(d)] for d in head["doc_id"]]), reads


def _texts(run: _Run, wanted: set[str], known: dict[str, str]) -> dict[str, str]:
    """The texts of the documents ``wanted`` (ids as text): from ``known``, else one pass over the corpus."""
    texts = {d: known[d] for d in wanted if d in known}
    if len(texts) < len(wanted):
        for doc_id, text in run.corpus.documents():
            if str(doc_id) in wanted and isinstance(text, str):
                texts[str(doc_id)] = text
                if len(texts) == len(wanted):
                    break
    return texts


def _read_exactly(run: _Run, pool: _Pool, peft_model, need: dict[str, list], texts: dict[str, str]
                  ) -> dict[tuple[str, str], ScannedDoc]:
    """Each probe's documents ``need`` (those with a text in ``texts``) read by forward passes under its own mirror in
    ``peft_model``, the base model's losses once per document; by (probe id, document id as text)."""
    index = {p.id: i for i, p in enumerate(pool.probes)}
    settings = {"max_length": run.max_length, "overlap": run.overlap, "batch_size": run.scan.windows.batch_size,
                "autocast": run.accelerator.autocast}
    listed = list({str(d): (d, texts[str(d)]) for docs in need.values() for d in docs if str(d) in texts}.values())
    if not listed:
        return {}
    base = {str(doc.doc_id): doc.base for doc in Scanner(peft_model, run.tokenizer, adapter_names=[], probe_ids=[],
                                                         **settings)(listed)}  # once per document
    reads = {}
    for pid, wanted in need.items():
        docs = [(d, texts[str(d)]) for d in wanted if str(d) in texts]
        if not docs:
            continue
        scanner = Scanner(peft_model, run.tokenizer, adapter_names=[pool.names[index[pid]]], probe_ids=[pid],
                          adapters_per_forward=1, **settings)
        for doc in scanner(docs, base_losses=((i, str(d), base[str(d)]) for i, (d, _) in enumerate(docs))):
            reads[(pid, str(doc.doc_id))] = doc
    return reads


def _report_evidence(run: _Run, pool: _Pool, result: AttributionResult, peft_model,
                     reads: dict[tuple[str, str], ScannedDoc]) -> dict[str, str]:
    """What the results and report.html show that the scan did not keep: the token evidence of each probe's top-k
    (after the linear read, which keeps none) and of its "moved the model" list (added to ``result.evidence``: each
    probe's documents are scored again under its own mirror in ``peft_model``, a few forward passes, unless the mixed
    read's ``reads`` hold them), and the texts of the listed documents outside the top-k (one pass over the corpus's
    text, only when some are missing). Returns those texts by document id."""
    from hf_mirror.report import missing_texts, moved_without_evidence

    need = moved_without_evidence(result)
    have = set() if result.evidence.empty else set(zip(result.evidence["probe_id"],
                                                       result.evidence["doc_id"].astype(str), strict=True))
    for pid, d in zip(result.topk["probe_id"], result.topk["doc_id"], strict=True):
        if (pid, str(d)) not in have and d not in need.setdefault(pid, []):
            need[pid].append(d)
    need = {pid: docs for pid, docs in need.items() if docs}
    wanted = missing_texts(result) | {str(d) for docs in need.values() for d in docs}
    if not wanted:
        return {}
    known = {**{d: doc.text for (_, d), doc in reads.items()},
             **dict(zip(result.topk["doc_id"].astype(str), result.topk["text"], strict=True))}
    texts = _texts(run, wanted, known)
    fresh = {pid: [d for d in docs if (pid, str(d)) not in reads] for pid, docs in need.items()}  # not read yet
    reads = {**reads, **_read_exactly(run, pool, peft_model, fresh, texts)}
    rows = []
    for pid in (p for p in result.probe_ids if p in need):
        for doc in (reads[(pid, str(d))] for d in need[pid] if (pid, str(d)) in reads):
            delta = run.mirror.sign * (doc.mirror[0] - doc.base)
            rows += [{"probe_id": pid, "doc_id": doc.doc_id, "position": i, "token": piece,
                      "base_loss": float(doc.base[i]), "mirror_loss": float(doc.mirror[0, i]),
                      "delta": float(delta[i])}
                     for i, piece in enumerate(token_pieces(run.tokenizer, doc.text, doc.token_ids))]
    if rows:
        extra = pd.DataFrame(rows, columns=EVIDENCE_COLUMNS)
        result.evidence = extra if result.evidence.empty else pd.concat([result.evidence, extra], ignore_index=True)
    return texts


def _base_cache(model, tokenizer, corpus: Corpus, scan: ScanConfig, max_length: int, overlap: int,
                precision: str, rank: int, world: int, weights: str | None = None) -> BaseLossCache | None:
    """The base-loss cache for this model, tokenizer, corpus and windowing (None when it cannot be keyed)."""
    fingerprint = corpus.fingerprint() if scan.speed.cache else None
    if fingerprint is None:
        if scan.speed.cache:
            logger.info("Corpus has no stable fingerprint (a generator?): base losses are not cached.")
        return None
    key = stable_key("base-losses-v1", weights or model_fingerprint(model), tokenizer_fingerprint(tokenizer),
                     fingerprint, corpus.text_column, corpus.id_column, max_length, overlap, precision,
                     scan.windows.fixed_width, str(next(model.parameters()).dtype))
    root = Path(scan.speed.cache_dir or default_cache_dir())
    cache = BaseLossCache(root, key, rank=rank, world=world)
    if not writable(root) and not cache.complete:  # a read-only cache is still read
        logger.warning("The cache directory %s is not writable: base losses are not cached (pass --cache-dir or "
                       "--no-cache).", root)
        return None
    return cache


def _control_row(rows, doc) -> np.ndarray:
    """The cached control scores of ``doc`` (the cache holds the same documents in the same order)."""
    row = next(rows, None)
    if row is None or row[0] != doc.seq or row[1] != str(doc.doc_id):
        raise StateError(f"The control-score cache does not match the corpus at document {doc.doc_id!r}; delete "
                         "the cache directory (--cache-dir / $HF_MIRROR_CACHE) or run with --no-cache.")
    return row[2]


def _probes_from_disk(out: Path, given: list[Probe]) -> list[Probe] | None:
    """On resume, reuse the probes (with their generated completions) that the interrupted run fitted."""
    path = out / "adapters" / "probes.jsonl"
    if not path.exists():
        if (path.parent / "fit.json").exists():
            logger.warning("%s is missing; generating the completions again.", path)
        return None
    try:
        saved = load_probes(path)
    except InputError as e:
        logger.warning("%s is damaged (%s); generating the completions again.", path, e)
        return None
    saved = saved[: len(given)]  # the control probes, if any, follow the run's own
    if [(p.id, p.prompt) for p in given] != [(p.id, p.prompt) for p in saved] or any(
        g.completion is not None and g.completion != s.completion for g, s in zip(given, saved, strict=True)
    ):
        logger.warning("%s does not hold this run's probes (damaged, or left by another run); generating the "
                       "completions again.", path)
        return None
    return saved


def _curvature(run: _Run):
    """The curvature that preconditions gradient mirrors (None unless the mirror settings ask for one)."""
    if run.mirror.fit != "gradient" or run.mirror.precondition == "none":
        return None
    from hf_mirror.curvature import curvature_for

    return curvature_for(run.model, run.tokenizer, run.corpus, run.mirror.precondition, run.mirror.curvature_docs,
                         run.max_length, run.scan.speed.cache_dir if run.scan.speed.cache else None,
                         run.model_fingerprint, cache=run.scan.speed.cache)


def _fit_or_reload(model, tokenizer, pool, names, mirror, max_length, out: Path, run_key: str, show_progress,
                   curvature=lambda: None):
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
                mirrors = load_mirrors(model, adapters, names)
            except Exception as e:  # intact files that still do not load: refuse rather than guess
                raise damaged(adapters, e) from e
            save_probes(pool, adapters / "probes.jsonl")  # written again: it may be the file that was damaged
            return mirrors, FitReport(fit["loss_before"], fit["loss_after"])
    elif any((adapters / n).exists() for n in names):
        logger.warning("%s is missing (a damaged or interrupted fit); fitting the mirrors again.", marker)
    peft_model, report = fit_mirrors(model, tokenizer, pool, names, mirror, max_length, show_progress, curvature())
    save_mirrors(peft_model, names, adapters)
    save_probes(pool, adapters / "probes.jsonl")
    fit = {"run_key": run_key, "loss_before": report.loss_before, "loss_after": report.loss_after,
           "sha256": hash_files(adapters, mirror_files(adapters, names))}
    atomic_write(marker, json.dumps(fit).encode())
    return peft_model, report
