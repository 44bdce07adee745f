"""probes.py: probe records from files and lists, the completion mask, adapter names, generated completions and the
control probes cut from the corpus; and probes that do not fit the window: windowed generation, or a refusal naming
the fix (never a crash, never a cut).

The newcomer's case (#27): a small model's 32 generated tokens decoded to text that re-tokenised to 95 tokens
(broken multi-byte characters decode as U+FFFD, three byte tokens each) and overflowed a 64-position model.
"""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror import attribute
from hf_mirror.errors import InputError
from hf_mirror.probes import (
    CONTROL_PREFIX,
    IGNORE_INDEX,
    Probe,
    adapter_name,
    check_probe_lengths,
    control_probes,
    encode_probe,
    generate_completions,
    load_probes,
    probe_length,
    save_probes,
    start_token_id,
)


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


def test_probes_from_dicts_strings_and_probes_get_string_ids():
    probes = load_probes([{"id": 7, "prompt": "a", "completion": " b"}, "plain prompt", Probe("x", "p")])
    assert probes == [Probe("7", "a", " b"), Probe("1", "plain prompt", None), Probe("x", "p", None)]
    assert probes[0].text == "a b" and probes[1].text == "plain prompt"


@pytest.mark.parametrize("records, match", [
    ([], "No probes"),
    ([{"id": "a"}], "no 'prompt'"),
    ([{"id": "a", "prompt": 3}], "prompt must be a string"),
    ([{"id": "a", "prompt": "p", "completion": 5}], "completion must be a string"),
    ([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}], "Duplicate probe id 'a'"),
    ([3.5], "is a float"),
])
def test_bad_records_are_input_errors(records, match):
    with pytest.raises(InputError, match=match):
        load_probes(records)


def test_a_probe_file_round_trips_and_names_unread_fields(tmp_path, caplog):
    path = tmp_path / "probes.jsonl"
    save_probes([Probe("q1", "Der Fuchs", " läuft"), Probe("q2", "b", None)], path, extra={"q1": {"adapter": "q1"}})
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"id": "q1", "prompt": "Der Fuchs", "completion": " läuft", "adapter": "q1"}
    with caplog.at_level(logging.WARNING, logger="hf_mirror.probes"):
        assert load_probes(path) == [Probe("q1", "Der Fuchs", " läuft"), Probe("q2", "b", None)]
    assert "'adapter'" in caplog.text  # a typo such as 'completon' would otherwise pass silently
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    with pytest.raises(InputError, match="bad.jsonl:2 is not valid JSON"):
        load_probes(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"id": "a", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_probes(tmp_path / "latin1.jsonl")
    with pytest.raises(InputError, match="does not exist"):
        load_probes(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        load_probes(tmp_path)


def test_the_loss_is_on_the_completion_only_unless_the_prompt_is_included(tok):
    probe = Probe("q", "the fox keeps", " a red lantern")
    enc = encode_probe(tok, probe)
    prompt = [start_token_id(tok), *tok("the fox keeps", add_special_tokens=False)["input_ids"]]
    completion = tok(" a red lantern", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][0].tolist() == prompt + completion  # tokenised apart: the boundary is exact
    assert enc["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + completion
    assert encode_probe(tok, probe, include_prompt=True)["labels"][0].tolist() == prompt + completion
    with pytest.raises(InputError, match="more than the context window"):
        encode_probe(tok, probe, max_length=len(prompt))
    for empty in ("", "   "):
        with pytest.raises(InputError, match="empty completion"):
            encode_probe(tok, Probe("q", "p", empty))


def test_start_token_is_bos_else_eos(tok):
    t = copy.deepcopy(tok)
    assert start_token_id(t) == (t.bos_token_id if t.bos_token_id is not None else t.eos_token_id)
    t.bos_token = None
    t.eos_token = None
    with pytest.raises(InputError, match="neither a BOS nor an EOS"):
        start_token_id(t)


def test_adapter_names_are_peft_safe_and_unique():
    taken: set[str] = set()
    names = [adapter_name(i, taken) for i in ("a.b", "a_b", "default", "", "x" * 100)]
    assert names == ["a_b", "a_b_2", "probe_default", "probe", "x" * 64]
    assert all("." not in n for n in names) and taken == set(names)


def test_missing_completions_are_the_models_greedy_generation(tiny_model, planted):
    model, tok = tiny_model
    given = [Probe("known", "p", " given"), Probe("gen", planted.probes()[0]["prompt"], None)]
    out = generate_completions(model, copy.deepcopy(tok), given, max_new_tokens=6)
    assert out[0] is given[0]
    prompt = [start_token_id(tok), *tok(given[1].prompt, add_special_tokens=False)["input_ids"]]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=tok.pad_token_id)[0, len(prompt):]
    assert out[1] == Probe("gen", given[1].prompt, tok.decode(greedy, skip_special_tokens=True))
    assert out[1].completion  # the planted model completes its facts


def test_control_probes_are_seeded_snippets_of_the_corpus(tok):
    docs = [(i, f"the lantern number {i} glows over the quiet harbour at night") for i in range(30)]
    docs.insert(3, (99, "too short"))  # fewer than 4 tokens: never a control
    controls = control_probes(docs, tok, 5, seed=1)
    assert controls == control_probes(docs, tok, 5, seed=1)
    assert controls != control_probes(docs, tok, 5, seed=2)
    assert [c.id for c in controls] == [f"{CONTROL_PREFIX}{i}" for i in range(5)]
    texts = {text for _, text in docs}
    assert all(any(text.startswith((c.prompt + c.completion).strip()) for text in texts) for c in controls)
    assert len(control_probes(docs[:3], tok, 5, strict=False)) == 3
    with pytest.raises(InputError, match="too few for 5 control probes"):
        control_probes(docs[:3], tok, 5)
