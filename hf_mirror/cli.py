"""The ``hf-mirror`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext

from hf_mirror.config import CALIBRATED_MIRROR, CALIBRATED_STEPS, MirrorConfig, ScanConfig
from hf_mirror.distributed import is_main_process, set_threads
from hf_mirror.errors import HfMirrorError, InputError
from hf_mirror.flags import add_config_flags, config_from_args, finite
from hf_mirror.methods import REGISTRY
from hf_mirror.terminal import escape_log_output, printable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (its help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a share between 0 and 1 (NaN refused)."""
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


MODEL_HELP = ("from_pretrained name or local path of a causal LM (a Hub id is 'name' or 'org/name'; anything else, "
              "or a path that exists here, is a local directory and never looked up on the Hub)")


def _add_attribute(sub) -> None:
    p = sub.add_parser(
        "attribute",
        help="attribute probe generations to corpus documents",
        description="Fit one LoRA mirror per probe and scan the corpus with forward passes; write the result to "
        "--output (topk.parquet, scores.parquet, evidence.parquet, probes.jsonl, config.json, adapters/).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantised)")
    p.add_argument(
        "--corpus",
        required=True,
        help="Hub dataset name, local file/glob/directory (json, jsonl, parquet, csv, txt) or a save_to_disk directory",
    )
    p.add_argument("--probes", required=True, help="JSON-lines file of {id, prompt, completion?}")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--method", choices=list(REGISTRY), default="mirror",
                   help="mirror (this toolkit's method) or a baseline; baselines ignore the mirror/scan-only options "
                   "(ekfac needs the optional extra: pip install 'hf-mirror[ekfac]')")
    g = p.add_argument_group("corpus")
    g.add_argument("--text-column", default="text")
    g.add_argument("--id-column", default=None, help="document id column (default: running index)")
    g.add_argument("--split", default="train")
    g.add_argument("--format", default=None, help="file format when the extension does not tell")
    g.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    add_config_flags(p.add_argument_group("mirror (one LoRA adapter per probe)"), MirrorConfig, hidden=False,
                     defaults=True)
    add_config_flags(p.add_argument_group("scan"), ScanConfig, hidden=False, defaults=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --output instead of resuming (the new result is built beside it and "
                   "swapped in when finished; only files listed in its hf_mirror.json are removed)")
    _progress_flag(p)


# the default n-gram length of index, audit and provenance: hf_mirror.retrieval.ngram.NGRAM (not imported here: it
# loads datasets; tests/test_cli_inputs.py checks the number)
NGRAM_HELP = ("n-gram length in tokens (default: 13 for every command; audit and provenance reuse a built --index at "
              "its own n)")


def _ngram_flag(p) -> None:
    p.add_argument("--ngram", type=positive_int, default=None, help=NGRAM_HELP)


def _overwrite_flag(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command in --output that another run wrote (only the files "
                   "its hf_mirror.json lists; the new one is built beside it and swapped in when finished)")


def _progress_flag(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and results are unchanged)")


def _add_show(sub) -> None:
    p = sub.add_parser(
        "show",
        help="print ranked documents of a result",
        description="Print each probe's generation and its top documents with the strongest tokens marked.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("directory", help="an output directory of `hf-mirror attribute`")
    p.add_argument("--probe", default=None, help="only this probe id")
    p.add_argument("-k", type=positive_int, default=5, help="documents per probe")
    p.add_argument("--tokens", type=positive_int, default=5, help="tokens to mark per document")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="attribute the bundled default model's generations (no downloads)",
        description="Train (or reuse from the cache) a small GPT-2 on the bundled WordNet facts, let it complete "
        "a few bundled prompts, attribute each generation against all bundled documents, and write report.html. "
        "Set HF_MIRROR_DEMO_FAST=1 for a much smaller training budget.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output", default="hf-mirror-demo", help="output directory (result files and report.html)")
    p.add_argument("--probes", type=positive_int, default=5, help="number of bundled prompts to complete and attribute")
    p.add_argument("--retrain", action="store_true", help="train the default model again even if cached")
    p.add_argument("--overwrite", action="store_true", help="attribute again instead of reusing a finished run")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="model cache (default: $HF_MIRROR_CACHE, else ~/.cache/hf_mirror)",
    )
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    _progress_flag(p)


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="flag evaluation items that leaked into the training corpus",
        description="Benchmark leakage audit. Detectors (--detectors): ngram = verbatim n-gram overlap of each "
        "item with the corpus (evidence: the copied spans); mirror = the item as a mirror probe, flagged when one "
        "document stands far above the rest (evidence: that document, its score and margin); minkprob = Min-K%% "
        "Prob membership score. With the mirror, the verdict is the combined detector: ngram OR (mirror AND "
        "minkprob). Writes report.json and report.html; --fail-above makes it a CI gate.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="the model (its tokenizer tokenises; it scores Min-K%% and mirrors)")
    p.add_argument("--corpus", required=True, help="training corpus, as for `attribute`")
    p.add_argument("--eval-set", required=True, help="evaluation set: file, directory, Hub name")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--eval-text-column", default="text")
    p.add_argument("--question-column", default=None,
                   help="with --answer-column: item = question + answer (the mirror's prompt and completion)")
    p.add_argument("--answer-column", default=None)
    p.add_argument("--eval-id-column", default=None)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--detectors", default="ngram,minkprob",
                   help="comma-separated among ngram, mirror, minkprob, or 'all' (= ngram,mirror,minkprob: the "
                   "combined detector; costs one mirror scan of the corpus per item)")
    _ngram_flag(p)
    p.add_argument("--threshold", type=fraction, default=0.5, help="ngram: leaked when this share of tokens is copied")
    p.add_argument("--combined-threshold", type=finite, default=None,
                   help="combined: leaked at this score (robust z units; default: the calibrated one)")
    p.add_argument("--mirror-threshold", type=finite, default=None,
                   help="mirror alone: the item's top document stands out at this top z (default: calibrated)")
    p.add_argument("--index", default=None, help="n-gram index directory: reused if built, else built there")
    p.add_argument("--no-membership", action="store_true", help="same as leaving minkprob out of --detectors")
    p.add_argument("--membership", choices=["mink", "mink++"], default="mink",
                   help="the minkprob detector's score: Min-K%% Prob (mink) or Min-K%%++ (mink++)")
    p.add_argument("--fail-above", type=fraction, default=None, help="exit 1 when the contamination rate is above")
    g = p.add_argument_group("mirror detector (see `hf-mirror attribute --help`)")
    add_config_flags(g, MirrorConfig, hidden=False, defaults=True, only=["steps", "lr", "rank"])
    add_config_flags(g, ScanConfig, hidden=False, defaults=True,
                     only=["batch_size", "adapters_per_forward", "candidates"])
    p.set_defaults(steps=CALIBRATED_STEPS)  # the detector's thresholds were calibrated with 3-step mirrors
    _overwrite_flag(p)
    _progress_flag(p)


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="build a corpus's retrieval indexes once (BM25 for attribute --index, n-grams for audit/provenance)",
        description="One streaming pass over the corpus builds its BM25 index (bm25s; `hf-mirror attribute --index "
        "DIR` reuses it for the candidates instead of indexing the corpus again), its verbatim n-gram index "
        "(`audit`/`provenance --index DIR`) and, with --dense, the model's mean-pooled document embeddings "
        "(memory-mapped). Under accelerate launch / torchrun every process reads its share and the main process "
        "merges them into the same index. Layout: DIR/manifest.json, DIR/bm25/, DIR/ngram/ (--backend infini-gram: "
        "DIR/infinigram/), DIR/dense/. Built in "
        "DIR/.hf_mirror-new/ and moved into place when complete (checkpointed: an interrupted build resumes when "
        "rerun); keyed by the corpus content and the tokenizer, so an index of another corpus or tokenizer is "
        "refused. DIR must be empty, new or an index of this command: a directory holding other files is refused, "
        "even with --overwrite, which replaces only the files of the earlier index.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="model or tokenizer path/name (its tokenizer is used; the model "
                   "itself only with --dense)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--format", default=None, help="file format when the extension does not tell (as attribute's)")
    p.add_argument("--dataset-config", default=None, help="Hub dataset configuration name (as attribute's)")
    _ngram_flag(p)
    p.add_argument("--dense", action="store_true", help="also store each document's embedding: the model's last "
                   "hidden states averaged over its tokens (one forward pass over the corpus)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing index (only the files its hf_mirror.json lists; swapped in when built)")
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint of an interrupted build")
    p.add_argument("--backend", choices=["ngram", "infini-gram"], default="ngram",
                   help="the verbatim index beside BM25 (+ --dense): ngram: hashed n-grams of one --ngram (ngram/); "
                   "infini-gram: a suffix array answering any n, for huge corpora (infinigram/; pip install "
                   "'hf_mirror[infinigram]'; built on the main process in a pass of its own, no checkpoint)")
    _progress_flag(p)


def _add_provenance(sub) -> None:
    p = sub.add_parser(
        "provenance",
        help="per generation: which document it was memorized from (or overlaps verbatim), with evidence",
        description="For each probe's generation (given, or the model's greedy one): the verbatim spans it shares "
        "with the corpus (n-gram index), the source document that covers most of it, the verdict when that "
        "document covers --threshold of its tokens (memorized, for the model's own generation of a probe without "
        "a completion; verbatim overlap, for a completion you gave), and the source's rank and score under mirror "
        "attribution. Writes provenance.json and provenance.html.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--corpus", required=True)
    p.add_argument("--probes", required=True, help="JSON-lines file of {id, prompt, completion?}")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--split", default="train")
    _ngram_flag(p)
    p.add_argument("--threshold", type=fraction, default=0.5,
                   help="memorized (or verbatim overlap) when one document holds this share")
    p.add_argument("--index", default=None, help="n-gram index directory: reused if built, else built there")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="for probes without a completion")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--no-mirror", action="store_true", help="verbatim spans only (no mirror attribution)")
    _overwrite_flag(p)
    _progress_flag(p)


def _add_memorization(sub) -> None:
    p = sub.add_parser(
        "memorization",
        help="extractable memorization rate of the corpus",
        description="Carlini et al. (2022) protocol: sample documents, prompt with their first P tokens, greedy-"
        "decode S tokens, count exact reproductions of the true next S tokens. Writes memorization.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--corpus", required=True)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--prefix-tokens", type=positive_int, default=32, help="P")
    p.add_argument("--suffix-tokens", type=positive_int, default=32, help="S")
    p.add_argument("--samples", type=positive_int, default=100, help="documents sampled (seeded reservoir)")
    p.add_argument("--seed", type=int, default=0)
    _overwrite_flag(p)
    _progress_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-mirror",
        description="Which training documents made the model say this? Forward-pass attribution with LoRA mirrors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_attribute(sub)
    _add_show(sub)
    _add_demo(sub)
    _add_audit(sub)
    _add_memorization(sub)
    _add_index(sub)
    _add_provenance(sub)
    for command in sub.choices.values():
        command.add_argument("--threads", type=positive_int, default=None,
                             help="CPU threads per process (default: torch's choice; try 1 on a busy machine)")
    return parser


def _attribute(args) -> int:

    from hf_mirror.corpus import Corpus
    from hf_mirror.pipeline import attribute
    from hf_mirror.render import format_result

    corpus = Corpus(args.corpus, text_column=args.text_column, id_column=args.id_column, split=args.split,
                    format=args.format, name=args.dataset_config)
    mirror, scan = config_from_args(MirrorConfig, args), config_from_args(ScanConfig, args)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else None
    result = attribute(args.model, corpus, args.probes, mirror=mirror, scan=scan, output_dir=args.output,
                       model_kwargs=kwargs, show_progress=not args.no_progress, overwrite=args.overwrite,
                       method=args.method)
    if is_main_process():
        print(format_result(result, k=min(3, args.top_k), color=sys.stdout.isatty()))
        print(f"\nwrote {result.directory} (open {result.directory / 'report.html'})")
    return 0


def _show(args) -> int:
    from hf_mirror.render import format_result
    from hf_mirror.results import AttributionResult

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    result = AttributionResult.load(args.directory)
    print(format_result(result, args.probe, args.k, args.tokens, color))
    return 0


def _demo(args) -> int:
    from hf_mirror.demo import run_demo
    from hf_mirror.render import format_result

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    report = run_demo(args.output, args.probes, args.cache_dir, args.retrain, show_progress=not args.no_progress,
                      overwrite=args.overwrite)
    print(format_result(report.result, k=3, color=color))
    print()
    print(report.summary())
    print(f"\nwrote {report.result.directory} (open {report.result.directory / 'report.html'})")
    return 0


def _open_or_build_index(args, corpus, tokenizer, index_dir):
    from hf_mirror.retrieval.infinigram import InfiniGramIndex, load_index
    from hf_mirror.retrieval.ngram import NGRAM, NgramIndex, build_key, remove_finished_checkpoint

    if (index_dir / "manifest.json").exists():
        index = load_index(index_dir, tokenizer)
        built_n = index.n
        if isinstance(index, InfiniGramIndex) and args.ngram is not None:
            index.n = args.ngram  # a suffix array answers any n
        if args.ngram is not None and index.n != args.ngram:
            raise InputError(f"The index in {index_dir} holds {index.n}-grams and --ngram asks for {args.ngram}: pass "
                             f"--ngram {index.n} (or leave --ngram out) to use it, or another --index directory for "
                             f"{args.ngram}-grams.")
        if (was := index.manifest.get("corpus")) != corpus.describe():
            raise InputError(f"The index in {index_dir} was built for another corpus ({(was or {}).get('source')}, "
                             f"columns {(was or {}).get('text_column')}/{(was or {}).get('id_column')}); pass another "
                             "--index directory for this corpus.")
        built, now = index.manifest.get("corpus_fingerprint"), corpus.fingerprint()
        if built != now:
            raise InputError(f"The index in {index_dir} was built from other corpus content (the corpus changed since, "
                             f"or its content cannot be verified: fingerprint {built} -> {now}); rebuild it with "
                             f"`hf-mirror index --overwrite --output {index_dir}`, or pass a new --index directory.")
        remove_finished_checkpoint(index_dir, build_key(corpus, tokenizer, built_n))
        return index
    if index_dir.is_dir() and any(index_dir.iterdir()):
        raise InputError(f"{index_dir} is not a complete index (no manifest.json: a half-written or damaged index, or "
                         f"another directory); rebuild it with `hf-mirror index --overwrite --output {index_dir}` "
                         "(same --model, --corpus and --ngram), or pass an empty or new --index directory.")
    return NgramIndex.build(corpus, tokenizer, n=args.ngram or NGRAM, output_dir=index_dir,
                            show_progress=not args.no_progress)


def audit_mirror(args: argparse.Namespace) -> MirrorConfig:
    """The leakage detector's mirror: the step-fitted mirror its thresholds were calibrated with (``--steps``,
    ``--lr`` and ``--rank`` from the flags)."""
    return config_from_args(MirrorConfig, args, **{**CALIBRATED_MIRROR, "steps": args.steps})


def _audit(args) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from hf_mirror.corpus import Corpus
    from hf_mirror.modeling import load_model, load_tokenizer
    from hf_mirror.ownership import AUDIT, digest, open_shared
    from hf_mirror.provenance.leakage import (
        DEFAULT_COMBINED_THRESHOLD,
        DEFAULT_MIRROR_THRESHOLD,
        DETECTORS,
        EvalSet,
        audit_leakage,
        write_report,
    )

    detectors = list(DETECTORS) if args.detectors.strip() == "all" else [
        d.strip() for d in args.detectors.split(",") if d.strip()]
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        raise InputError(f"Unknown --detectors {unknown or args.detectors!r}; choose among {list(DETECTORS)} or 'all'.")
    if args.no_membership and "minkprob" in detectors:
        detectors.remove("minkprob")
        if not detectors:
            raise InputError("--no-membership leaves no detector; add ngram or mirror to --detectors.")
    records = EvalSet(args.eval_set, text_column=args.eval_text_column, question_column=args.question_column,
                      answer_column=args.answer_column, id_column=args.eval_id_column, split=args.eval_split).records()
    tokenizer = load_tokenizer(args.model)
    corpus = Corpus(args.corpus, text_column=args.text_column, id_column=args.id_column, split=args.split)
    corpus.check()  # before the output directory is touched
    identity = _identity(args, corpus, items=digest([asdict(r) for r in records]))
    output, work = open_shared(args.output, identity, args.overwrite, AUDIT)
    with nullcontext() if output is None else output:  # on leaving, the lock is released (finished or not)
        index = None
        if "ngram" in detectors:
            index = _open_or_build_index(args, corpus, tokenizer, Path(args.index) if args.index else work / "index")
        model = load_model(args.model) if ("minkprob" in detectors or "mirror" in detectors) else None
        mirror = scan = None
        if "mirror" in detectors:
            mirror = audit_mirror(args)
            scan = config_from_args(ScanConfig, args, top_k=5, normalize="loo", index=None)  # --index: the n-grams
        report = audit_leakage(
            index, records, args.threshold, model, tokenizer, detectors=detectors, corpus=corpus, mirror=mirror,
            scan=scan, output_dir=work / "mirror" if "mirror" in detectors else None,
            mirror_threshold=DEFAULT_MIRROR_THRESHOLD if args.mirror_threshold is None else args.mirror_threshold,
            combined_threshold=(DEFAULT_COMBINED_THRESHOLD if args.combined_threshold is None
                                else args.combined_threshold),
            show_progress=not args.no_progress, membership=args.membership,
        )
        if output is None:  # under accelerate launch / torchrun: the main process reports
            return 0
        write_report(report, work)
        output.finish()
    out = Path(args.output)
    print(f"{report['leaked']} of {len(records)} evaluation items leaked (contamination rate "
          f"{report['contamination_rate']:.1%}, detectors {','.join(detectors)}, verdict by "
          f"{report['detector']['method']}); wrote {out / 'report.json'} and {out / 'report.html'}")
    if args.fail_above is not None and report["contamination_rate"] > args.fail_above:
        print(f"hf-mirror: contamination rate {report['contamination_rate']:.1%} is above --fail-above "
              f"{args.fail_above:.1%}", file=sys.stderr)
        return 1
    return 0


def _index(args) -> int:

    from hf_mirror.corpus import Corpus
    from hf_mirror.modeling import load_tokenizer

    corpus = Corpus(args.corpus, text_column=args.text_column, id_column=args.id_column, split=args.split,
                    format=args.format, name=args.dataset_config)  # the corpus attribute --index will check
    from hf_mirror.retrieval import build_index

    model = None
    if args.dense:
        from hf_mirror.distributed import process_state
        from hf_mirror.modeling import resolve_model

        model, tokenizer, _ = resolve_model(args.model)
        model.to(process_state().device).eval()
    else:
        tokenizer = load_tokenizer(args.model)
    from hf_mirror.retrieval.ngram import NGRAM

    index = build_index(corpus, tokenizer, args.output, n=args.ngram or NGRAM, model=model, overwrite=args.overwrite,
                        show_progress=not args.no_progress, resume=not args.restart, backend=args.backend)
    if is_main_process():
        print(f"{index!r}; wrote {args.output}")
    return 0


def _provenance(args) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from hf_mirror.config import RankingConfig
    from hf_mirror.corpus import Corpus
    from hf_mirror.modeling import resolve_model
    from hf_mirror.ownership import PROVENANCE, digest, open_shared
    from hf_mirror.pipeline import ScanConfig
    from hf_mirror.probes import load_probes
    from hf_mirror.provenance.generation import generation_provenance, summary, write_provenance

    model, tokenizer, _ = resolve_model(args.model)
    corpus = Corpus(args.corpus, text_column=args.text_column, id_column=args.id_column, split=args.split)
    corpus.check()  # before the output directory is touched
    probes = load_probes(args.probes)  # read once: refused before the output directory is touched
    identity = _identity(args, corpus, probes=digest([asdict(p) for p in probes]))
    output, work = open_shared(args.output, identity, args.overwrite, PROVENANCE)
    with nullcontext() if output is None else output:  # on leaving, the lock is released (finished or not)
        index = _open_or_build_index(args, corpus, tokenizer, Path(args.index) if args.index else work / "index")
        report = generation_provenance(model, corpus, probes, tokenizer=tokenizer, index=index,
                                       threshold=args.threshold, use_mirror=not args.no_mirror,
                                       scan=ScanConfig(ranking=RankingConfig(top_k=args.top_k)),
                                       max_new_tokens=args.max_new_tokens,
                                       output_dir=work, top=args.top_k, show_progress=not args.no_progress)
        if output is None:
            return 0
        write_provenance(report, work)
        output.finish()
    out = Path(args.output)
    for r in report["items"]:
        line = f"{printable(r['id'], False)}: {r['verdict']}"
        if r["source"] is not None:
            line += (f" {'from' if r['verdict'] == 'memorized' else 'with'} {printable(r['source'], False)} "
                     f"({r['copied_tokens']}/{r['n_tokens']} tokens verbatim)")
        if r.get("mirror") and r["mirror"]["top"]:
            line += f"; mirror top document {printable(r['mirror']['top'][0]['doc_id'], False)}"
            if r["source"] is not None:
                line += f", source at rank {r['mirror']['source_rank']}"
        print(line)
    print(f"{summary(report)}; wrote {out / 'provenance.json'} and {out / 'provenance.html'}")
    return 0


def _memorization(args) -> int:
    import json
    from pathlib import Path

    from hf_mirror.corpus import Corpus
    from hf_mirror.ownership import MEMORIZATION, Output
    from hf_mirror.provenance.memorization import extractable_memorization

    corpus = Corpus(args.corpus, text_column=args.text_column, id_column=args.id_column, split=args.split)
    identity = _identity(args, corpus)
    Output.check(args.output, identity, args.overwrite, MEMORIZATION)  # refused before the work, written after it
    # the model as a path: the lengths are checked against its config and the corpus before the weights load
    report = extractable_memorization(args.model, None, corpus, args.prefix_tokens, args.suffix_tokens, args.samples,
                                      args.seed, show_progress=not args.no_progress)
    out = Path(args.output)
    with Output.open(out, identity, args.overwrite, MEMORIZATION) as output:
        (output.work / "memorization.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        output.finish()
    print(f"extractable memorization: {report['exact']} of {report['samples']} sampled documents "
          f"({report['extractable_rate']:.1%}) reproduce their next {args.suffix_tokens} tokens from "
          f"{args.prefix_tokens}; wrote {out / 'memorization.json'}")
    return 0


LOCAL_INPUTS = ("model", "corpus", "probes", "eval_set")
# flags that change no output file (--fail-above only sets the exit code)
NOT_SETTINGS = frozenset({"command", "output", "overwrite", "restart", "no_progress", "threads", "corpus",
                          "fail_above"})


def _identity(args: argparse.Namespace, corpus, **content: object) -> dict:
    """What decides the output of `audit`, `provenance` or `memorization` (its manifest's run, hf_mirror.ownership):
    the corpus and its content, ``content`` (the items' or probes' digest) and every flag, local paths resolved."""
    settings = {}
    for key, value in sorted(vars(args).items()):
        if key not in NOT_SETTINGS:
            local = key in (*LOCAL_INPUTS, "index") and isinstance(value, str) and os.path.exists(value)
            settings[key] = os.path.realpath(value) if local else value
    return {"command": args.command, "corpus": corpus.describe(), "corpus content": corpus.fingerprint(), **content,
            "settings": settings}


def _offline_when_local(args: argparse.Namespace) -> None:
    """Every input on disk: keep the Hub libraries offline (they read these variables when first imported)."""
    given = [getattr(args, name) for name in LOCAL_INPUTS if isinstance(getattr(args, name, None), str)]
    if all(os.path.exists(path) for path in given):
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")


READ_ONLY = frozenset({"show"})  # commands that only read a finished run: no model, no threads


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    escape_log_output()  # control characters in documents, probes and ids never reach the terminal raw
    _offline_when_local(args)
    restore_bars = False
    if getattr(args, "no_progress", False):  # transformers' own bars too ("Loading weights"), for this command
        from transformers.utils import logging as transformers_logging

        restore_bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
    try:
        if args.command not in READ_ONLY:  # only commands that compute use threads (and hear the busy hint)
            set_threads(args.threads)
        return {"attribute": _attribute, "show": _show, "demo": _demo, "audit": _audit,
                "memorization": _memorization, "index": _index, "provenance": _provenance}[args.command](args)
    except HfMirrorError as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
        print(f"hf-mirror: error{where}: {printable(e)}", file=sys.stderr)
        return e.exit_code
    finally:
        if restore_bars:  # a caller that runs main() again (a notebook, a test) gets its bars back
            transformers_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
