"""Probes that do not fit the window: windowed generation, or a refusal naming the fix (never a crash, never a cut).

The newcomer's case (#27): a small model's 32 generated tokens decoded to text that re-tokenised to 95 tokens
(broken multi-byte characters decode as U+FFFD, three byte tokens each) and overflowed a 64-position model.
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror import attribute
from hf_mirror.errors import InputError
from hf_mirror.probes import Probe, check_probe_lengths, generate_completions, probe_length


@pytest.fixture
def short_model(tok):
    """An untrained 64-position GPT-2 on the session tokenizer: it generates byte pieces that decode as U+FFFD."""
    torch.manual_seed(0)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=2, n_embd=32, n_head=2, bos_token_id=eos,
                        eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = eos
    tokenizer = copy.deepcopy(tok)
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def test_generation_that_retokenises_past_the_window_is_refused_with_the_max_new_tokens_that_fits(short_model):
    model, tokenizer = short_model
    probe = Probe("a", "zokaka keeps a")
    with pytest.raises(InputError, match=r"re-tokenises to \d+ tokens.*--max-new-tokens (\d+)") as err:
        generate_completions(model, tokenizer, [probe], 32)
    assert "\ufffd" in str(err.value) and "context window of 64 tokens" in str(err.value)
    fits = int(re.search(r"--max-new-tokens (\d+)", str(err.value)).group(1))
    assert 0 < fits < 32
    (done,) = generate_completions(model, tokenizer, [probe], fits)  # the advice works
    assert probe_length(tokenizer, done) <= 64


def test_a_long_prompt_generates_what_fits_and_says_so(short_model, caplog):
    model, tokenizer = short_model
    prompt = " ".join(["the weather in the north is cold today."] * 4)  # 40 tokens with the start token
    n_prompt = probe_length(tokenizer, Probe("p", prompt, ""))
    assert 32 < n_prompt < 64  # before the fix: IndexError from the position embeddings at 64
    with caplog.at_level(logging.WARNING, logger="hf_mirror.probes"):
        try:
            generate_completions(model, tokenizer, [Probe("p", prompt)], 32)
        except InputError as e:  # the random model's bytes may still re-tokenise past the window: named, not a crash
            assert "--max-new-tokens" in str(e)
    assert f"generating at most {64 - n_prompt} tokens, not --max-new-tokens 32" in caplog.text
    with pytest.raises(InputError, match="no room is left to generate"):
        generate_completions(model, tokenizer, [Probe("q", " ".join([prompt] * 2))], 32)


def test_a_given_completion_longer_than_the_window_is_refused_before_fitting(short_model, texts, tmp_path):
    model, tokenizer = short_model
    long = " ".join(texts[:20])
    with pytest.raises(InputError, match=r"more than the context window of 64 tokens.*Shorten its prompt or "
                       r"completion\.$"):
        check_probe_lengths(tokenizer, [Probe("a", "x", long)], 64, 64)
    with pytest.raises(InputError, match=r"or raise --max-length \(the model's context is 64 tokens\)"):
        check_probe_lengths(tokenizer, [Probe("a", "x", long)], 32, 64)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="more than the context window of 64 tokens"):
        attribute(model, texts, [{"id": "a", "prompt": "zokaka keeps a", "completion": long}], tokenizer=tokenizer,
                  output_dir=out, show_progress=False)
    assert not (out / "adapters").exists()  # refused before any mirror was fitted


def test_attribute_with_a_generation_too_long_for_the_model_names_the_flag(short_model, texts, tmp_path):
    model, tokenizer = short_model
    with pytest.raises(InputError, match=r"Pass --max-new-tokens \d+"):
        attribute(model, texts, [{"id": "a", "prompt": "zokaka keeps a"}], tokenizer=tokenizer,
                  output_dir=tmp_path / "run", show_progress=False)
