"""The baselines' side of the method contract: :class:`Scorer` (a method that scores each document of its one shard,
the whole corpus, in one process) and the run every scorer shares (:func:`attribute_baseline`: probes, scoring,
merge and record, written like :func:`hf_mirror.attribute`'s result)."""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hf_mirror import methods
from hf_mirror.baselines._common import Document, iter_documents
from hf_mirror.cache import model_fingerprint
from hf_mirror.config import ScanConfig
from hf_mirror.corpus import Corpus, as_corpus
from hf_mirror.errors import InputError
from hf_mirror.merge import merge_shards
from hf_mirror.methods import Method, Request
from hf_mirror.modeling import resolve_model, window_length
from hf_mirror.ownership import Output, check_output_path
from hf_mirror.probes import generate_completions, load_probes
from hf_mirror.results import AttributionResult
from hf_mirror.runs import run_identity, run_record, stable_key
from hf_mirror.scan import Skipped
from hf_mirror.scoring import ScoreBook

logger = logging.getLogger(__name__)


class Scorer(Method):
    """A baseline method: it scores each document of its shard (the whole corpus) for every probe.

    Every scorer is built the same way, ``cls(model, tokenizer, probes=, max_length=, overlap=, **options)`` (its
    options keyword-only too; ``model`` holds only the config when the class does not need the model and every probe
    has its completion), scores with :meth:`score` and releases what it held with :meth:`close`. A scorer runs in one
    process, does not resume (a rerun scores the corpus again) and keeps no token evidence: its results have the
    same columns as the mirror's, with an empty evidence table. Scores are reported raw, higher = more supporting.
    """

    multi_process = False
    resumes = False
    token_evidence = False
    INPUTS = ("probes", "max_length", "overlap")  # what the run gives every scorer; the other keywords are options

    @abstractmethod
    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """How it scores its shard: each document (in order) with its score per probe, higher = more supporting."""

    def close(self) -> None:
        """Release what scoring held (the caller's model comes back as it was); by default there is nothing."""

    @classmethod
    def attribute(cls, request: Request) -> AttributionResult:
        scan = request.scan or ScanConfig()
        return attribute_baseline(cls.name, request.model, request.corpus, request.probes, tokenizer=request.tokenizer,
                                  output_dir=request.output_dir, top_k=scan.ranking.top_k,
                                  show_progress=request.show_progress, max_length=scan.windows.max_length,
                                  overlap=scan.windows.overlap, max_new_tokens=scan.scoring.max_new_tokens,
                                  model_kwargs=request.model_kwargs, overwrite=request.overwrite, **request.options)


def _scorer(method: str) -> type[Scorer]:
    """The scorer registered under ``method`` (:mod:`hf_mirror.methods`)."""
    cls = methods.load(method) if method in methods.REGISTRY else None
    if cls is None or not issubclass(cls, Scorer):
        names = sorted(n for n in methods.REGISTRY if n != methods.MIRROR)
        raise InputError(f"Unknown baseline {method!r}; choose one of {names}.")
    return cls


def _options(cls: type[Scorer], options: dict) -> dict:
    """Check ``options`` against the scorer's keyword-only parameters."""
    params = inspect.signature(cls.__init__).parameters
    allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - set(Scorer.INPUTS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"Unknown option(s) {unknown} for baseline {cls.name!r}; it accepts {sorted(allowed)}.")
    return options


def _config_only(name: str, tokenizer, model_kwargs: dict | None):
    """``(config holder, tokenizer, name)`` for a method that reads only the tokenizer and the context length."""
    from types import SimpleNamespace

    from hf_mirror.modeling import load_config, load_tokenizer, prepare_tokenizer

    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k == "gguf_file"}
    config = load_config(name, **kwargs)
    tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(name, **kwargs)
    return SimpleNamespace(config=config), tokenizer, name


def attribute_baseline(
    method: str,
    model,
    corpus,
    probes,
    *,
    tokenizer=None,
    output_dir: str | Path | None = None,
    top_k: int = 10,
    show_progress: bool = True,
    max_length: int | None = None,
    overlap: int | None = None,
    max_new_tokens: int = 32,
    model_kwargs: dict | None = None,
    overwrite: bool = False,
    **options,
) -> AttributionResult:
    """Rank the corpus documents for each probe with a baseline ``method`` (one of :data:`METHODS`).

    Inputs are those of :func:`hf_mirror.attribute`: ``model`` a name/path or a loaded causal LM (then pass
    ``tokenizer``), ``corpus`` a :class:`Corpus`/path/Dataset/list, ``probes`` a JSON-lines path or a list;
    probes without a completion get the model's greedy generation. ``options`` go to the method's class
    (e.g. ``k1=``/``b=`` for bm25, ``similarity="dot"`` for gradsim, ``batch_size=`` for embedding,
    ``damping=``/``strategy=`` for ekfac, which needs the optional ``kronfluence``). ``output_dir`` is owned like
    :func:`hf_mirror.attribute`'s: another run there is refused unless ``overwrite``.
    """
    cls = _scorer(method)
    methods.check(cls)  # one process
    options = _options(cls, options)
    if top_k < 1:
        raise InputError("top_k must be at least 1.")
    t0 = time.perf_counter()
    corpus = as_corpus(corpus)
    final = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix=f"hf_mirror_{method}_"))
    check_output_path(final)
    given = load_probes(probes)
    corpus.check()
    if not cls.needs_model and isinstance(model, (str, Path)) and all(p.completion is not None for p in given):
        model, tokenizer, model_name = _config_only(str(model), tokenizer, model_kwargs)  # the weights are not used
    else:
        model, tokenizer, model_name = resolve_model(model, tokenizer, model_kwargs)
        model.eval()
    max_length = window_length(model, tokenizer, max_length)
    overlap = overlap if overlap is not None else max(1, max_length // 8)
    if not 1 <= overlap < max_length:
        raise InputError(f"overlap must be between 1 and max_length - 1 ({max_length - 1}), got {overlap}.")

    settings = {"options": options, "top_k": top_k, "max_length": max_length, "overlap": overlap,
                "max_new_tokens": max_new_tokens}
    weights = model_fingerprint(model) if hasattr(model, "state_dict") else None  # None: the weights are not read
    identity = run_identity(method, model_name, weights, tokenizer, corpus, given, 1, settings)
    with Output.open(final, identity, overwrite) as output:
        _score(output.work, method, cls, model, tokenizer, str(model_name), corpus, given, options, settings,
               show_progress, model_kwargs, t0)
        output.finish()
    return AttributionResult.load(final)


def _score(out: Path, method: str, cls, model, tokenizer, model_name: str, corpus: Corpus, given: list,
           options: dict, settings: dict, show_progress: bool, model_kwargs: dict | None, t0: float) -> None:
    """Score the corpus with the method's class ``cls`` and write the result to ``out``."""
    top_k, max_length, overlap, max_new_tokens = (settings[k] for k in ("top_k", "max_length", "overlap",
                                                                          "max_new_tokens"))
    probe_list = given if all(p.completion is not None for p in given) else \
        generate_completions(model, tokenizer, given, max_new_tokens, max_length=max_length)
    ids = [p.id for p in probe_list]
    run_key = stable_key(method, str(model_name), corpus.describe(), [asdict(p) for p in probe_list], options, top_k,
                         max_length, overlap)

    scorer = cls(model, tokenizer, probes=probe_list, max_length=max_length, overlap=overlap, **options)
    shard = out / "shards" / method
    if shard.exists():  # an earlier run of this method (interrupted, or rerun): scorers do not resume
        logger.warning("%s does not resume: the scores an earlier run left in %s are discarded and the corpus is "
                       "scored again from the start (--method %s resumes from its checkpoints).", method, shard,
                       methods.MIRROR)
        shutil.rmtree(shard)
    skipped: list[Skipped] = []
    next_seq = 0
    try:
        book = ScoreBook(ids, sign=1.0, normalize="none", top_k=top_k, shard_dir=shard, run_key=run_key)
        from hf_mirror.progress import progress_bar

        bar = progress_bar(total=corpus.num_documents(), desc=method, unit="doc", disable=not show_progress)
        docs = iter_documents(corpus.documents(), tokenizer, max_length, overlap, skipped)
        with torch.enable_grad() if cls.needs_grad else torch.no_grad():
            for doc, scores in scorer.score(docs):
                book.add_scores(doc.doc_id, doc.text, doc.token_ids, scores, doc.seq, skipped)
                next_seq = doc.seq + 1
                bar.update(1)
        bar.close()
        if skipped:
            next_seq = max(next_seq, skipped[-1].seq + 1)
        book.finish(next_seq, skipped, tokenizer)
    finally:
        scorer.close()

    merged = merge_shards([shard], out, ids, top_k)
    records = [asdict(p) for p in probe_list]
    own = {"options": options, "scan": {"top_k": top_k, "max_length": max_length, "overlap": overlap,
                                         "normalize": "none", "max_new_tokens": max_new_tokens}}
    param = next(model.parameters()) if cls.needs_model else None  # None: the weights are not read
    config = {"method": method, **run_record(
        model_name, model_kwargs, corpus, own, device=None if param is None else str(param.device),
        num_processes=1, run_key=run_key, torch_dtype=None if param is None else str(param.dtype),
        stats={**merged["stats"], "seconds": time.perf_counter() - t0})}
    result = AttributionResult(out, topk=merged["topk"], evidence=merged["evidence"], probes=records,
                               skipped=merged["skipped"], config=config)
    result.save(out)
    from hf_mirror.report import write_report

    write_report(result, out)
