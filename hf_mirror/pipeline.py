"""The pipeline: probes -> mirrors -> scan -> scores -> AttributionResult."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from accelerate import Accelerator
from datasets import Dataset, IterableDataset

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.mirror import MirrorConfig, fit_mirrors, save_mirrors
from hf_mirror.modeling import check_causal_lm, context_length, load_model, load_tokenizer, prepare_tokenizer
from hf_mirror.probes import Probe, adapter_name, control_probes, generate_completions, load_probes
from hf_mirror.results import AttributionResult
from hf_mirror.scan import Scanner
from hf_mirror.scoring import ScoreBook

logger = logging.getLogger(__name__)

PACKAGES = ("hf-mirror", "torch", "transformers", "datasets", "accelerate", "peft", "evaluate")


@dataclass
class ScanConfig:
    """How the corpus is scanned and scored.

    ``max_length``: tokens per window (default: the model's context, at most 1024); longer documents are
    split into windows that repeat ``overlap`` tokens of context (default ``max_length // 8``).
    ``normalize="zscore"`` standardises each document's scores across the probes of the run, which removes
    the drift that any perturbation causes on generic documents; when there are fewer than ``min_pool``
    probes, control probes cut from corpus snippets are added to the pool (``controls`` sets their number
    explicitly). ``normalize="none"`` reports the raw mean token-loss delta.
    """

    max_length: int | None = None
    overlap: int | None = None
    batch_size: int = 8
    top_k: int = 10
    normalize: str = "zscore"
    controls: int | None = None
    min_pool: int = 8
    max_new_tokens: int = 32

    def n_controls(self, n_probes: int) -> int:
        if self.controls is not None:
            return self.controls
        return max(0, self.min_pool - n_probes) if self.normalize == "zscore" else 0


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
) -> AttributionResult:
    """Attribute each probe's generation to the corpus documents it is most supported by.

    ``model`` is a ``from_pretrained`` name/path or a loaded causal LM (then pass ``tokenizer``);
    ``corpus`` a :class:`Corpus`, path, Hub name or ``Dataset``; ``probes`` a JSON-lines path or a list of
    ``Probe``/dicts. Probes without a completion get the model's greedy generation. Everything the run
    produces is written to ``output_dir`` (a temporary directory if not given).
    """
    mirror = mirror or MirrorConfig()
    scan = scan or ScanConfig()
    corpus = _as_corpus(corpus)
    accelerator = Accelerator()

    model_name = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        model = load_model(str(model), **(model_kwargs or {}))
        if tokenizer is None:
            tokenizer = load_tokenizer(
                str(model_name), **{k: v for k, v in (model_kwargs or {}).items() if k == "gguf_file"}
            )
    if tokenizer is None:
        raise InputError("Pass the tokenizer along with a loaded model: attribute(model, ..., tokenizer=tok).")
    check_causal_lm(model)
    prepare_tokenizer(tokenizer)
    model.to(accelerator.device).eval()

    max_length = scan.max_length or context_length(model, tokenizer)
    overlap = scan.overlap if scan.overlap is not None else max(1, max_length // 8)
    if not 1 <= overlap < max_length:
        raise InputError(f"overlap must be between 1 and max_length - 1 ({max_length - 1}), got {overlap}.")

    probe_list: list[Probe] = load_probes(probes)
    probe_list = generate_completions(model, tokenizer, probe_list, scan.max_new_tokens)
    n_controls = scan.n_controls(len(probe_list))
    controls = (
        control_probes(
            corpus.documents(),
            tokenizer,
            n_controls,
            mirror.seed,
            span=min(16, (max_length - 1) // 2),
            strict=scan.controls is not None,
        )
        if n_controls
        else []
    )
    n_controls = len(controls)
    normalize = scan.normalize
    if normalize == "zscore" and scan.controls is None and len(probe_list) + n_controls < 3:
        logger.warning("Too few probes and corpus snippets to z-score; reporting raw score deltas instead.")
        normalize = "none"
    pool = probe_list + controls
    taken: set[str] = set()
    names = [adapter_name(p.id, taken) for p in pool]
    ids = [p.id for p in pool]
    # validate scoring options before the (expensive) fit
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_"))
    out.mkdir(parents=True, exist_ok=True)
    book = ScoreBook(ids, mirror.sign, normalize, scan.top_k, out / "scores.parquet", n_controls)

    peft_model, report = fit_mirrors(model, tokenizer, pool, names, mirror, max_length, show_progress)
    try:
        if accelerator.is_main_process:
            save_mirrors(peft_model, names, out / "adapters")
        scanner = Scanner(peft_model, tokenizer, names, ids, max_length, overlap, scan.batch_size, show_progress)
        for doc in scanner(corpus.documents(accelerator.process_index, accelerator.num_processes)):
            book.add(doc)
        book.finish()
        topk, evidence = book.topk_frames(tokenizer)
    finally:
        peft_model.unload()  # give the caller back their model without LoRA layers

    records = [
        {
            **asdict(p),
            "adapter": n,
            "probe_loss_before": report.loss_before[p.id],
            "probe_loss_after": report.loss_after[p.id],
        }
        for p, n in zip(probe_list, names, strict=False)
    ]
    config = {
        "model": str(model_name),
        "model_kwargs": {k: str(v) for k, v in (model_kwargs or {}).items()},
        "corpus": corpus.describe(),
        "mirror": mirror.to_dict(),
        "scan": {
            **asdict(scan),
            "max_length": max_length,
            "overlap": overlap,
            "controls": n_controls,
            "normalize": normalize,
        },
        "control_probes": [asdict(c) for c in controls],
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "versions": package_versions(),
        "torch_dtype": str(next(model.parameters()).dtype),
        "stats": {"documents": scanner.n_documents, "tokens": scanner.n_tokens, "skipped": len(scanner.skipped)},
    }
    skipped = [{"doc_id": s.doc_id, "reason": s.reason} for s in scanner.skipped]
    result = AttributionResult(out, topk, evidence, records, skipped, config)
    result.save(out)
    return result
