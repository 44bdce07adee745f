"""Train (or reuse) the default demo model on the bundled WordNet facts and report its fact-completion accuracy.

    python recipes/train_tiny_lm.py                 # build into the cache, print accuracy
    python recipes/train_tiny_lm.py --retrain       # train again even if cached
    HF_MIRROR_DEMO_FAST=1 python recipes/train_tiny_lm.py   # the small test budget

Overrides such as ``--epochs 40 --stride 2`` train a different model, cached under its own config hash.
"""

from __future__ import annotations

import argparse
import json
import time

from hf_mirror.demo import (
    DemoModelConfig,
    accuracy_sample,
    fact_accuracy,
    load_default_model,
    load_facts,
    training_facts,
)
from hf_mirror.flags import add_config_flags, apply_overrides


def main() -> None:
    base = DemoModelConfig.from_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, DemoModelConfig, hidden=False)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--held-out", type=int, default=200, help="also score this many facts the model never saw")
    args = p.parse_args()
    config = apply_overrides(base, args)

    t0 = time.perf_counter()
    model, tokenizer, info = load_default_model(config, args.cache_dir, args.retrain)
    print(f"model: {info['path']} ({time.perf_counter() - t0:.1f}s to build or load)")
    print(json.dumps({"config": info["config"], "training_documents": info["training_documents"]}))
    acc = info["fact_accuracy"]
    n_words = acc["n_words"]
    print(
        f"training facts (fixed sample of {acc['n']}): {acc['exact']} exact completions, "
        f"{acc[f'first_{n_words}_words']} with the first {n_words} words right"
    )
    if args.held_out:
        trained = {f["id"] for f in training_facts(load_facts(), config)}
        unseen = [f for f in load_facts() if f["id"] not in trained]
        if unseen:
            held = fact_accuracy(model, tokenizer, accuracy_sample(unseen, args.held_out))
            print(
                f"held-out facts (never trained on, {held['n']}): {held['exact']} exact, "
                f"{held[f'first_{n_words}_words']} with the first {n_words} words right"
            )


if __name__ == "__main__":
    main()
