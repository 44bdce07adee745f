"""No warning in a normal run that the user cannot act on (#27 item 6)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pandas as pd
import torch

import hf_mirror.distributed as distributed
from hf_mirror.cli import main
from hf_mirror.results import AttributionResult


def _busy(monkeypatch):
    """A machine whose load leaves no core free, and torch wanting several threads."""
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (100.0, 100.0, 100.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(distributed, "on_gpu", lambda: False)


def test_busy_hint_only_on_commands_that_compute(tmp_path, monkeypatch, caplog):
    topk = pd.DataFrame({"probe_id": ["p"], "rank": [1], "doc_id": ["d"], "score": [0.4], "raw_score": [0.4],
                         "n_tokens": [1], "text": ["x"]})
    config = {"model": "m", "scan": {"top_k": 1, "normalize": "none"}, "stats": {"documents": 1}}
    evidence = pd.DataFrame({"probe_id": ["p"], "doc_id": ["d"], "position": [0], "token": ["x"], "base_loss": [1.0],
                             "mirror_loss": [1.4], "delta": [0.4]})
    AttributionResult(tmp_path, topk=topk, evidence=evidence, probes=[{"id": "p", "prompt": "q"}], skipped=[],
                      config=config).save(tmp_path / "run")
    _busy(monkeypatch)
    caplog.set_level(logging.WARNING)
    assert main(["show", str(tmp_path / "run")]) == 0  # read-only: no threads to tune
    assert "busy" not in caplog.text
    assert main(["attribute", "--model", str(tmp_path / "no-model"), "--corpus", str(tmp_path / "no.jsonl"),
                 "--probes", str(tmp_path / "no-probes.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "busy" in caplog.text and "--threads 1" in caplog.text  # a command that computes still hears it


def test_no_ipywidgets_warning_in_a_notebook_kernel():
    """A Jupyter kernel without ipywidgets: importing hf_mirror first keeps tqdm.auto's "IProgress not found"
    warning (text bars work; nothing to act on) out of the notebook; without hf_mirror it shows."""
    script = textwrap.dedent("""
        import sys, types, warnings
        sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # what tqdm takes for a kernel
        import IPython
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            if sys.argv[1] == "hf_mirror":
                import hf_mirror
            import tqdm.auto
        print(sum("IProgress" in str(w.message) for w in caught))
    """)
    try:
        import ipywidgets  # noqa: F401
        widgets = True
    except ImportError:
        widgets = False

    def count(first: str) -> int:
        done = subprocess.run([sys.executable, "-c", script, first], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    assert count("hf_mirror") == 0
    if not widgets:
        assert count("tqdm") == 1  # the warning this guards against exists here


def test_sharing_mirrors_between_processes_does_not_warn_about_a_missing_config(tmp_path, recwarn):
    """A model loaded from a GGUF file has no config.json beside it; the 2-process recipe shares each process's
    mirrors with adapter_states, and PEFT warned "Could not find a config file ... will assume that the vocabulary was
    not modified": nothing a user can act on (the mirrors never touch the embeddings)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_mirror.mirror import adapter_states

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.name_or_path = str(tmp_path)  # like a GGUF file's directory: no config.json
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    warnings.simplefilter("always")
    adapter_states(peft_model, ["default"])
    assert not [w for w in recwarn if "Could not find a config file" in str(w.message)]
