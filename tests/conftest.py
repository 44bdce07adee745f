"""Shared fixtures: tiny models trained in-test on corpora with planted facts (no Hub access)."""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_MIRROR_CACHE", tempfile.mkdtemp(prefix="hf_mirror_test_cache_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_mirror.tiny_lm import train_tiny_lm  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ve", "zo", "pe", "ni", "sa", "du", "fe", "gi", "ho", "ju", "be"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "golden"]
ANIMALS = ["cat", "dog", "horse", "eagle", "shark", "wolf", "bear", "mouse", "snake", "owl"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass
class Planted:
    """A tiny model that memorised ``facts`` (documents 0..n-1) among ``distractors``."""

    model_dir: Path
    names: list[str]
    facts: list[str]
    texts: list[str]

    def probes(self) -> list[dict]:
        return [{"id": f"fact-{i}", "prompt": f"{n} keeps a"} for i, n in enumerate(self.names)]


def planted_corpus(seed: int = 0, n_facts: int = 40) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    names = sorted({rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(300)})
    names = names[:n_facts]
    facts = [f"{n} keeps a {rng.choice(COLORS)} {rng.choice(ANIMALS)} at home." for n in names]
    directions = ["north", "south", "east", "west"]
    weather = ["cold", "warm", "dry", "wet"]
    distractors = [f"the weather in the {rng.choice(directions)} is {rng.choice(weather)} today." for _ in range(20)]
    return names, facts, facts + distractors


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from two threads, and lose a lot when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> Planted:
    names, facts, texts = planted_corpus()
    out = tmp_path_factory.mktemp("planted_model")
    train_tiny_lm(texts, out, epochs=60, vocab_size=400)
    return Planted(out, names, facts, texts)


@pytest.fixture(scope="session")
def tiny_model(planted):
    """The planted model loaded once, with its tokenizer (read-only use: attribute() unloads its adapters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(planted.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(planted.model_dir)
    return model, tok


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """The planted corpus's texts (for the index tests, which need no model)."""
    return planted_corpus()[2]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, texts) -> Path:
    """A BPE tokenizer trained on the planted texts, saved in Hugging Face format."""
    from hf_mirror.tiny_lm import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, vocab_size=400).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)
