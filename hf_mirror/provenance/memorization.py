"""Extractable memorization (Carlini et al. 2022): prompt with a document's first P tokens, greedy-decode S tokens,
and count the documents whose true next S tokens come back exactly."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.probes import start_token_id
from hf_mirror.progress import progress_bar


@dataclass(kw_only=True)
class MemorizationSample:
    doc_id: object
    prefix: str
    true_suffix: str
    generated_suffix: str
    exact: bool
    matched_tokens: int  # leading suffix tokens reproduced before the first mismatch


LENGTH_FLAGS = "--prefix-tokens/--suffix-tokens (prefix_tokens/suffix_tokens)"


def sample_documents(corpus: Corpus, tokenizer, n: int, min_tokens: int, seed: int = 0) -> list[tuple[object, list]]:
    """A seeded reservoir sample of ``n`` documents with at least ``min_tokens`` tokens (one streaming pass).

    Raises :class:`InputError` naming the length flags when no document is that long.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[object, list]] = []
    seen = longest = 0
    for doc_id, text in corpus.documents():
        if not isinstance(text, str) or not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) < min_tokens:
            continue
        seen += 1
        if len(reservoir) < n:
            reservoir.append((doc_id, ids))
        elif (j := rng.randrange(seen)) < n:
            reservoir[j] = (doc_id, ids)
    if not reservoir:
        raise InputError(f"No document has {min_tokens} tokens (prefix + suffix; the longest has {longest}); lower "
                         f"{LENGTH_FLAGS} so that they add up to at most {longest}.")
    return reservoir


def check_context(model_config, tokenizer, prefix_tokens: int, suffix_tokens: int) -> None:
    """Refuse a prefix + suffix (plus the start token) longer than the model's context window."""
    from types import SimpleNamespace

    from hf_mirror.modeling import context_length

    context = context_length(SimpleNamespace(config=model_config), tokenizer, cap=10**9)
    if 1 + prefix_tokens + suffix_tokens > context:
        raise InputError(f"prefix_tokens + suffix_tokens = {prefix_tokens + suffix_tokens} (+1 start token) exceeds "
                         f"the model's context of {context} tokens; lower {LENGTH_FLAGS}.")


@torch.no_grad()
def extractable_memorization(
    model, tokenizer, corpus: Corpus, prefix_tokens: int = 32, suffix_tokens: int = 32, samples: int = 100,
    seed: int = 0, show_progress: bool = False,
) -> dict:
    """Exact-match rate of greedy continuations over sampled documents, with every sample's evidence.

    ``model`` is a loaded causal LM or a ``from_pretrained`` name/path; with a name (``tokenizer=None`` loads its
    tokenizer) the lengths are checked against its config and the corpus before the model is loaded.
    """
    from hf_mirror.modeling import load_config, load_tokenizer, resolve_model

    if prefix_tokens < 1 or suffix_tokens < 1 or samples < 1:
        raise InputError("prefix_tokens, suffix_tokens and samples (--prefix-tokens, --suffix-tokens, --samples) "
                         "must be positive.")
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model))
        check_context(load_config(str(model)), tokenizer, prefix_tokens, suffix_tokens)
    elif model is not None:
        check_context(model.config, tokenizer, prefix_tokens, suffix_tokens)
    docs = sample_documents(corpus, tokenizer, samples, prefix_tokens + suffix_tokens, seed)
    model, tokenizer, _ = resolve_model(model, tokenizer)
    device = next(model.parameters()).device
    start = start_token_id(tokenizer)
    results = []
    for doc_id, ids in progress_bar(iterable=docs, desc="memorization", disable=not show_progress):
        prefix, truth = ids[:prefix_tokens], ids[prefix_tokens : prefix_tokens + suffix_tokens]
        input_ids = torch.tensor([[start, *prefix]], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=suffix_tokens, pad_token_id=tokenizer.pad_token_id)
        out = out[0, input_ids.shape[1] :].tolist()
        mismatches = (i for i, (a, b) in enumerate(zip(out, truth, strict=False)) if a != b)
        matched = next(mismatches, min(len(out), len(truth)))
        results.append(MemorizationSample(doc_id=doc_id, prefix=tokenizer.decode(prefix),
                                          true_suffix=tokenizer.decode(truth), generated_suffix=tokenizer.decode(out),
                                          exact=out == truth, matched_tokens=matched))
    exact = sum(r.exact for r in results)
    return {"extractable_rate": exact / len(results), "exact": exact, "samples": len(results),
            "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "seed": seed,
            "items": [asdict(r) for r in results]}
