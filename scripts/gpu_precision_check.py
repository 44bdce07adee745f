"""bf16 autocast + SDPA attribution against fp32: do the top-1 documents match?

    python scripts/gpu_precision_check.py [--device auto|cpu|cuda] [--output DIR] [--docs 400] [--probes 8]

Builds a GPT-2 from config (random weights, 4 blocks x 256, byte-level BPE trained on the bundled WordNet
corpus; SDPA attention, the transformers default), saves it, writes a corpus of bundled WordNet entries and
probes that are verbatim corpus entries (prompt = headword, completion = the rest), and runs
``hf-mirror attribute --precision no`` and ``--precision bf16`` on the same inputs. Prints a Markdown table (per
probe: its source document, the fp32 and bf16 top-1 documents) and exits 1 when a top-1 document differs.

On CUDA, bf16 autocasts the scan; on the CPU hf-mirror scans in fp32 whatever ``--precision`` says, so the CPU
run (``--device cpu``, or ``auto`` without CUDA) only checks that the path works end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_inputs(out: Path, n_docs: int, n_probes: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Model (from config), corpus and probes under ``out``; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_mirror.demo import load_facts
    from hf_mirror.tiny_lm import train_tokenizer

    facts = load_facts()[:n_docs]
    torch.manual_seed(seed)
    tok = train_tokenizer([f["text"] for f in facts], 2000)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f["id"], "text": f["text"]}) + "\n" for f in facts))
    fits = [f for f in facts if len(tok(f["text"])["input_ids"]) < 100]  # a probe must fit the 128-token context
    step = max(1, len(fits) // n_probes)
    chosen = fits[::step][:n_probes]
    probes = out / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f["id"], "prompt": f["prompt"], "completion": f["completion"]}) + "\n"
                              for f in chosen))
    return model_dir, corpus, probes


def _hf_mirror() -> list[str]:
    exe = shutil.which("hf-mirror")
    return [exe] if exe else [sys.executable, "-m", "hf_mirror.cli"]


def attribute(model_dir: Path, corpus: Path, probes: Path, output: Path, precision: str, env: dict) -> float:
    cmd = [*_hf_mirror(), "attribute", "--model", str(model_dir), "--corpus", str(corpus), "--id-column", "id",
           "--probes", str(probes), "--output", str(output), "--precision", precision, "--max-length", "128",
           "--batch-size", "16", "--no-cache", "--no-progress", "--overwrite", "--top-k", "3"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"gpu_precision_check: `{' '.join(cmd)}` failed with exit code {done.returncode}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cuda: fail without CUDA; auto: CUDA when available, else the CPU (fp32 only)")
    p.add_argument("--output", type=Path, default=None, help="keep the model, inputs and both results here")
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from hf_mirror.modeling import load_model
    from hf_mirror.results import AttributionResult

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print(f"gpu_precision_check: --device cuda, but torch {torch.__version__} sees no CUDA device.",
              file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("gpu_precision_check: no CUDA, running on the CPU (hf-mirror scans in fp32 there: this only checks "
              "the path).", file=sys.stderr)
    out = args.output or Path(tempfile.mkdtemp(prefix="hf_mirror_precision_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir, corpus, probes = build_inputs(out, args.docs, args.probes)
    attn = load_model(str(model_dir)).config._attn_implementation
    seconds = {prec: attribute(model_dir, corpus, probes, out / f"result-{prec}", prec, env) for prec in ("no", "bf16")}
    fp32, bf16 = AttributionResult.load(out / "result-no"), AttributionResult.load(out / "result-bf16")
    rows, mismatches = [], 0
    for line in probes.read_text().splitlines():
        pid = json.loads(line)["id"]
        a, b = str(fp32.top(pid, 1)["doc_id"][0]), str(bf16.top(pid, 1)["doc_id"][0])
        mismatches += a != b
        rows.append({"probe": pid, "fp32_top1": a, "bf16_top1": b, "match": a == b, "source_top1": a == pid})
    print(f"device: {device}; attention: {attn}; fp32 run {seconds['no']:.1f} s, bf16 run {seconds['bf16']:.1f} s "
          f"(device recorded by the runs: {fp32.config.get('device')}, {bf16.config.get('device')})")
    print("| probe (= its source document) | fp32 top-1 | bf16 top-1 | match |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['probe']} | {r['fp32_top1']} | {r['bf16_top1']} | {'yes' if r['match'] else 'NO'} |")
    print(f"top-1 documents match for {len(rows) - mismatches}/{len(rows)} probes; the source document is fp32's "
          f"top-1 for {sum(r['source_top1'] for r in rows)}/{len(rows)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "attention": attn, "seconds": seconds, "rows": rows,
                                         "mismatches": mismatches}, indent=2) + "\n")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
