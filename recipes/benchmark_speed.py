"""Scan cost per probe count, as a multiple of ONE plain forward pass over the same corpus, in the same run.

    python recipes/benchmark_speed.py [--models tiny gpt2-small] [--probes 1 8 32] [--docs 300] [--json PATH]

Models are built from config (random weights: speed does not depend on training) with a byte-level BPE
tokenizer trained on the bundled corpus. For each model and probe count T it times three scans:
  naive        every mirror on all blocks, base pass computed     -> about T + 1 forward passes
  cached       base losses from the cache                          -> about T
  trunk+cache  mirrors on the top 2 blocks (1 of 2), lower blocks run once -> about T x 2 / n_layer + trunk
  +mixed8      trunk+cache, scoring up to 8 probes per forward with PEFT mixed-adapter batches
and reports each as a multiple of the floor, tokens/s, the mirror fitting time, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror import demo
from hf_mirror.corpus import Window, document_tokens, windows
from hf_mirror.mirror import MirrorConfig, fit_mirrors
from hf_mirror.modeling import prepare_tokenizer
from hf_mirror.probes import Probe
from hf_mirror.scan import Scanner, _collate, token_losses
from hf_mirror.tiny_lm import train_tokenizer
from hf_mirror.trunk import SharedTrunk

MODELS = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, vocab=2000),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab=8000),
}


def _floor_seconds(model, tok, docs: list[tuple[int, str]], max_length: int, batch_size: int) -> tuple[float, int]:
    """One plain forward pass (per-token losses) over every window of the corpus."""
    wins = [Window(0, start, ids, ctx) for _, text in docs
            for start, ids, ctx in windows(document_tokens(tok, text), max_length, max_length // 8)]
    batches = [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            ids, mask = _collate(b, tok.pad_token_id, "cpu")
            token_losses(model, ids, mask)
    return time.perf_counter() - t0, sum(len(w.input_ids) for w in wins)


def _scan(model, tok, names, ids, docs, max_length, batch_size, base=None, trunk=None, group=1) -> tuple[float, list]:
    scanner = Scanner(model, tok, names, ids, max_length, max_length // 8, batch_size, trunk=trunk,
                      adapters_per_forward=group)
    t0 = time.perf_counter()
    out = list(scanner(iter(docs), base_losses=iter(base) if base is not None else None))
    return time.perf_counter() - t0, out


def bench_model(name: str, spec: dict, texts: list[str], facts: list[dict], probe_counts: list[int], n_docs: int,
                batch_size: int, max_length: int) -> list[dict]:
    torch.manual_seed(0)
    tok = prepare_tokenizer(train_tokenizer(texts, spec["vocab"]))
    config = GPT2Config(vocab_size=len(tok), n_positions=max_length, n_embd=spec["n_embd"], n_layer=spec["n_layer"],
                        n_head=spec["n_head"], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    docs = [(i, t) for i, t in enumerate(texts[:n_docs])]
    t_max = max(probe_counts)
    probes = [Probe(f["headword"], f["prompt"], f["completion"]) for f in facts[-t_max:]]
    top = list(range(max(1, spec["n_layer"] - 2), spec["n_layer"]))  # the top 2 blocks (1 of a 2-block model)
    rows = []
    model = GPT2LMHeadModel(config).eval()
    _floor_seconds(model, tok, docs, max_length, batch_size)  # warm-up
    for t in probe_counts:
        floor, n_tokens = min(_floor_seconds(model, tok, docs, max_length, batch_size) for _ in range(2))
        names = [f"p{i}" for i in range(t)]
        row = {"model": name, "probes": t, "documents": len(docs), "tokens": n_tokens, "floor_s": floor}
        t0 = time.perf_counter()
        all_layers, _ = fit_mirrors(model, tok, probes[:t], names, MirrorConfig(), max_length, show_progress=False)
        row["fit_s"] = time.perf_counter() - t0
        row["naive_s"], scanned = _scan(all_layers, tok, names, names, docs, max_length, batch_size)
        base = [(d.seq, str(d.doc_id), d.base) for d in scanned]
        row["cached_s"], _ = _scan(all_layers, tok, names, names, docs, max_length, batch_size, base=base)
        all_layers.unload()
        top_only, _ = fit_mirrors(model, tok, probes[:t], names, MirrorConfig(layers=top), max_length,
                                  show_progress=False)
        trunk = SharedTrunk(top_only, top[0])
        row["trunk_cached_s"], _ = _scan(top_only, tok, names, names, docs, max_length, batch_size, base=base,
                                         trunk=trunk)
        row["mixed_s"], _ = _scan(top_only, tok, names, names, docs, max_length, batch_size, base=base, trunk=trunk,
                                  group=min(t, 8))
        top_only.unload()
        for k in ("naive", "cached", "trunk_cached", "mixed"):
            row[f"{k}_x_floor"] = row[f"{k}_s"] / floor
            row[f"{k}_tok_s"] = n_tokens / row[f"{k}_s"]
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(row)
        print(_format([row], header=len(rows) == 1), flush=True)
    return rows


def _format(rows: list[dict], header: bool = True) -> str:
    head = (f"{'model':<11} {'T':>3} {'docs':>5} {'floor s':>8} {'fit s':>7} {'naive x':>8} {'cached x':>9} "
            f"{'trunk+cache x':>14} {'+mixed8 x':>10} {'naive tok/s':>12} {'trunk tok/s':>12} {'peak RSS MB':>12}")
    lines = [head] if header else []
    for r in rows:
        lines.append(f"{r['model']:<11} {r['probes']:>3} {r['documents']:>5} {r['floor_s']:>8.2f} {r['fit_s']:>7.1f} "
                     f"{r['naive_x_floor']:>8.1f} {r['cached_x_floor']:>9.1f} {r['trunk_cached_x_floor']:>14.1f} "
                     f"{r['mixed_x_floor']:>10.1f} "
                     f"{r['naive_tok_s']:>12.0f} {r['trunk_cached_tok_s']:>12.0f} {r['peak_rss_mb']:>12.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2-small"], choices=sorted(MODELS))
    p.add_argument("--probes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    facts = demo.load_facts()
    texts = [f["text"] for f in facts]
    rows = []
    for name in args.models:
        rows += bench_model(name, MODELS[name], texts, facts, args.probes, args.docs, args.batch_size, args.max_length)
    print("\n" + _format(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
