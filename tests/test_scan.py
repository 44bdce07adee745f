"""scan.py: base and mirror token losses of every document, window by window: the same losses as a plain forward pass,
every token once, in stream order, whatever the batching; skipped documents, the base-loss cache and non-finite
losses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_mirror.corpus import document_tokens
from hf_mirror.errors import InputError, ScoreError, StateError
from hf_mirror.scan import Scanner, collate, token_losses

TEXTS = ["the fox keeps a red lantern by the quiet harbour",
         "a wet owl sleeps in the cold north tower at night and dreams of the warm south",
         "rain"]


@pytest.fixture(scope="module")
def mirrors(tok):
    """A 2-block GPT-2 with two LoRA adapters (random B: each moves the losses its own way), and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_mirror.mirror import quiet_peft

    tokenizer = copy.deepcopy(tok)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    with quiet_peft():
        peft_model = get_peft_model(model.eval(), config, adapter_name="m0")
        peft_model.add_adapter("m1", config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model.eval(), tokenizer


def scan(mirrors, texts=TEXTS, **kwargs):
    model, tokenizer = mirrors
    settings = {"max_length": 64, "overlap": 8, "batch_size": 2, **kwargs}
    scanner = Scanner(model, tokenizer, adapter_names=["m0", "m1"], probe_ids=["p0", "p1"], **settings)
    return scanner, list(scanner(list(enumerate(texts))))


def plain(mirrors, text: str, adapter: str | None) -> np.ndarray:
    """A document's token losses from one forward pass over all of it."""
    model, tokenizer = mirrors
    ids = torch.tensor([document_tokens(tokenizer, text)])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return token_losses(model, ids, torch.ones_like(ids))[0].numpy()
        model.set_adapter(adapter)
        return token_losses(model, ids, torch.ones_like(ids))[0].numpy()


def test_the_losses_are_a_plain_forward_passes(mirrors):
    _, docs = scan(mirrors)
    for d, text in zip(docs, TEXTS, strict=True):
        assert list(d.token_ids) == document_tokens(mirrors[1], text)[1:]  # the start token is not scored
        assert np.allclose(d.base, plain(mirrors, text, None), atol=1e-5)
        for p, name in enumerate(("m0", "m1")):
            assert np.allclose(d.mirror[p], plain(mirrors, text, name), atol=1e-5)
    assert not np.allclose(docs[0].mirror[0], docs[0].base, atol=1e-3)  # the adapters move the losses


def test_long_documents_are_scored_in_windows_every_token_once(mirrors):
    scanner, docs = scan(mirrors, max_length=8, overlap=3)
    for d, text in zip(docs, TEXTS, strict=True):
        n = len(document_tokens(mirrors[1], text)) - 1
        assert d.base.shape == (n,) and d.mirror.shape == (2, n) and np.isfinite(d.mirror).all()
        # the first window sees the same prefix as the whole document
        assert np.allclose(d.base[:7], plain(mirrors, text, None)[:7], atol=1e-5)
    assert scanner.forward_passes > 3 * len(TEXTS)  # several windows per long document, base + 2 mirrors each


@pytest.mark.parametrize("settings", [{"batch_size": 1}, {"batch_size": 3, "sort_batches": 4},
                                      {"fixed_width": True}, {"adapters_per_forward": 2}])
def test_batching_does_not_change_the_losses(mirrors, settings):
    _, reference = scan(mirrors, max_length=8, overlap=3)
    _, docs = scan(mirrors, max_length=8, overlap=3, **settings)
    for a, b in zip(reference, docs, strict=True):
        assert a.seq == b.seq and a.doc_id == b.doc_id
        assert np.allclose(a.base, b.base, atol=1e-5) and np.allclose(a.mirror, b.mirror, atol=1e-5)


def test_documents_come_in_stream_order_and_the_empty_ones_are_skipped(mirrors):
    model, tokenizer = mirrors
    scanner = Scanner(model, tokenizer, adapter_names=["m0", "m1"], probe_ids=["p0", "p1"], max_length=64, overlap=8,
                      batch_size=4)
    stream = [("a", TEXTS[1]), ("b", None), ("c", "   "), ("d", TEXTS[2]), ("e", TEXTS[0])]
    docs = list(scanner(stream, start=10))
    assert [(d.doc_id, d.seq) for d in docs] == [("a", 10), ("d", 13), ("e", 14)]
    assert [(s.doc_id, s.reason, s.seq) for s in scanner.skipped] == [
        ("b", "missing text", 11), ("c", "empty or whitespace-only", 12)]
    assert scanner.n_documents == 3 and scanner.next_seq == 15
    with pytest.raises(InputError, match="non-string text"):
        list(scanner([("x", 42)]))


def test_cached_base_losses_replace_the_base_model_and_must_match_the_corpus(mirrors):
    model, tokenizer = mirrors
    _, first = scan(mirrors)
    cache = [(d.seq, str(d.doc_id), d.base) for d in first]
    scanner = Scanner(model, tokenizer, adapter_names=["m0", "m1"], probe_ids=["p0", "p1"], max_length=64, overlap=8)
    again = list(scanner(list(enumerate(TEXTS)), base_losses=iter(cache)))
    assert scanner.base_passes == 0
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.base, b.base) and np.allclose(a.mirror, b.mirror, atol=1e-6)
    with pytest.raises(StateError, match="base-loss cache does not match"):
        scanner = Scanner(model, tokenizer, adapter_names=["m0"], probe_ids=["p0"], max_length=64, overlap=8)
        list(scanner(list(enumerate(TEXTS)), base_losses=iter(cache[1:])))


def test_a_non_finite_loss_names_the_probe(mirrors):
    model, tokenizer = mirrors
    layer = next(m for n, m in model.named_modules() if n.endswith("c_attn") and hasattr(m, "lora_B"))
    weight = layer.lora_B["m1"].weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(ScoreError, match="mirror of probe 'p1'"):
            scanner = Scanner(model, tokenizer, adapter_names=["m0", "m1"], probe_ids=["p0", "p1"], max_length=64,
                              overlap=8)
            list(scanner(list(enumerate(TEXTS))))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_collate_pads_on_the_right():
    ids, mask = collate([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert collate([[5]], 0, "cpu", width=4)[0].tolist() == [[5, 0, 0, 0]]


def test_token_losses_are_each_tokens_cross_entropy(mirrors):
    model, tokenizer = mirrors
    ids = torch.tensor([document_tokens(tokenizer, TEXTS[0])])
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=ids).logits[0]
        losses = token_losses(model, ids, torch.ones_like(ids))[0]
    want = -torch.log_softmax(logits[:-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(losses, want, atol=1e-5)
