"""Faster scans give the same scores: shared trunk (lower blocks run once) and mixed-adapter batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_mirror import (
    CheckpointConfig,
    MirrorConfig,
    RankingConfig,
    ScanConfig,
    ScoringConfig,
    SpeedConfig,
    WindowConfig,
    attribute,
)
from hf_mirror.flags import nested_config
from hf_mirror.trunk import SharedTrunk, find_blocks


def _models(tok):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=4, n_head=2,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128, bos_token_id=tok.eos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_trunk_matches_full_forward(tiny_model, planted, tmp_path, arch):
    _, tok = tiny_model
    model = _models(tok)[arch]
    corpus = [*planted.texts[:12], " ".join(planted.facts[:5])]
    kw = dict(tokenizer=tok, show_progress=False, mirror=MirrorConfig(fit="steps", layers=[2, 3], steps=2, lr=1e-2))

    pairs = zip(planted.probes()[:3], planted.facts[:3], strict=True)
    probes = [{**p, "completion": fact[len(p["prompt"]) :]} for p, fact in pairs]

    def run(name, **scan):
        return attribute(model, corpus, probes, output_dir=tmp_path / name,
                         scan=nested_config(ScanConfig, {"rank_by": "mirror", "normalize": "none", "max_length": 24,
                                                         "overlap": 4, "batch_size": 4, "adapters_per_forward": 1,
                                                         **scan}), **kw)

    plain = run("plain", shared_trunk=False, cache=False)
    shared = run("shared", cache=False)
    run("cached")
    cached = run("cached2")  # base losses from the cache: the trunk runs alone
    assert cached.config["stats"]["base_passes"] == 0
    mixed = run("mixed", shared_trunk=False, cache=False, adapters_per_forward=2)  # 2 probes per forward (stacked LoRA)
    mixed_trunk = run("mixed_trunk", adapters_per_forward=3)
    assert mixed.config["stats"]["forward_passes"] < plain.config["stats"]["forward_passes"]
    for other in (shared, cached, mixed, mixed_trunk):
        a = plain.scores().sort_values(["probe_id", "doc_id"])
        b = other.scores().sort_values(["probe_id", "doc_id"])
        np.testing.assert_allclose(a["raw_score"], b["raw_score"], atol=1e-5)
        assert np.abs(a["raw_score"]).max() > 1e-4  # the mirrors did move the losses
    np.testing.assert_allclose(plain.evidence["mirror_loss"], shared.evidence["mirror_loss"], atol=1e-5)


def test_trunk_only_runs_lower_blocks(tiny_model):
    _, tok = tiny_model
    model = _models(tok)["gpt2"]
    calls = []
    blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))  # after the block ran
    trunk = SharedTrunk(model, 2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with trunk.capture(stop=True):
        model(input_ids=ids)
    assert calls == [0, 1] and trunk.hidden.shape == (1, 4, 32)
    calls.clear()
    with trunk.reuse():
        model(input_ids=ids)
    assert calls == [2, 3] and all(b is not None for b in blocks)
    with pytest.raises(ValueError, match="lowest adapted block"):
        SharedTrunk(model, 0)


def test_length_sorted_batches_pad_less_and_score_the_same(tiny_model, planted, tmp_path):
    """Pooling windows and batching them by length cuts padding on mixed lengths; scores and order stay put."""
    model, tok = tiny_model
    long = [" ".join(planted.texts[i : i + 5]) for i in range(12)]
    corpus = [t for pair in zip(planted.texts[20:32], long, strict=True) for t in pair]  # short, long, short, ...
    probes = planted.probes()[:2]

    def run(name, sort_batches):
        scan = ScanConfig(windows=WindowConfig(max_length=48, overlap=8, batch_size=4, sort_batches=sort_batches),
                          scoring=ScoringConfig(normalize="none"), ranking=RankingConfig(rank_by="mirror"),
                          speed=SpeedConfig(cache=False), checkpoints=CheckpointConfig(checkpoint_every=3))
        return attribute(model, corpus, probes, tokenizer=tok, output_dir=tmp_path / name, show_progress=False,
                         mirror=MirrorConfig(fit="steps", steps=2), scan=scan)

    plain, pooled = run("plain", 1), run("pooled", 8)
    stats_plain, stats_pooled = plain.config["stats"], pooled.config["stats"]
    assert stats_pooled["window_tokens"] == stats_plain["window_tokens"]
    assert stats_pooled["padded_tokens"] < 0.8 * stats_plain["padded_tokens"]
    a = plain.scores().sort_values(["probe_id", "doc_id"])
    b = pooled.scores().sort_values(["probe_id", "doc_id"])
    assert list(a["doc_id"]) == list(b["doc_id"])
    np.testing.assert_allclose(a["raw_score"], b["raw_score"], atol=1e-5)
    assert np.abs(a["raw_score"]).max() > 1e-4


def _lora_weights(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def _fit(model, tok, probes, names, cfg):
    from hf_mirror.mirror import fit_mirrors

    peft_model, report = fit_mirrors(model, tok, probes, names, cfg, show_progress=False)
    weights = _lora_weights(peft_model)
    peft_model.unload()
    return weights, report


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fitting_top_layer_mirrors_runs_the_trunk_once_with_the_same_result(tiny_model, planted, arch, monkeypatch):
    from hf_mirror import mirror as mirror_mod
    from hf_mirror.probes import Probe

    _, tok = tiny_model
    model = _models(tok)[arch]
    probes = [Probe(p["id"], p["prompt"], fact[len(p["prompt"]) :])
              for p, fact in zip(planted.probes()[:2], planted.facts[:2], strict=True)]
    cfg = MirrorConfig(fit="steps", layers=[2, 3], steps=3, lr=1e-2, fit_batch=1)
    calls = []
    first_block = find_blocks(model)[0]
    handle = first_block.register_forward_pre_hook(lambda *a: calls.append(1))
    weights, _ = _fit(model, tok, probes, ["p0", "p1"], cfg)
    assert len(calls) == 2  # block 0 ran once per probe, not once per step
    calls.clear()
    _fit(model, tok, probes, ["p0", "p1"], MirrorConfig(fit="steps", layers=[2, 3], steps=3, lr=1e-2, fit_batch=2))
    assert len(calls) == 1  # ... and once per group of probes fitted together
    handle.remove()
    monkeypatch.setattr(mirror_mod, "_trunk", lambda *a: None)  # the plain path: every step runs every block
    ref, _ = _fit(model, tok, probes, ["p0", "p1"], cfg)
    assert ref.keys() == weights.keys() and any(float(w.abs().max()) > 0 for n, w in ref.items() if "lora_B" in n)
    for n, w in ref.items():
        torch.testing.assert_close(weights[n], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", [None, [2, 3]])
def test_fitting_probes_together_gives_the_adapters_of_fitting_them_one_by_one(tiny_model, planted, arch, layers):
    """Probes of different lengths in one padded batch, each row through its own stacked adapter: the same
    adapters and probe losses as fitting each probe alone, for ascent and descent, Adam and SGD."""
    from hf_mirror.probes import Probe

    _, tok = tiny_model
    model = _models(tok)[arch]
    probes = [Probe(p["id"], p["prompt"], fact[len(p["prompt"]) :] + " and more" * i)
              for i, (p, fact) in enumerate(zip(planted.probes()[:5], planted.facts[:5], strict=True))]
    names = [f"m{i}" for i in range(5)]
    for extra in ({}, {"direction": "learn", "optimizer": "sgd", "lr": 0.5}):
        base = {"fit": "steps", "target_modules": None, "layers": layers, "steps": 3, "lr": 1e-2, "rank": 4, **extra}
        one, report_one = _fit(model, tok, probes, names, MirrorConfig(fit_batch=1, **base))
        together, report = _fit(model, tok, probes, names, MirrorConfig(fit_batch=3, **base))  # groups of 3 and 2
        assert one.keys() == together.keys()
        assert any(float(w.abs().max()) > 1e-3 for n, w in one.items() if "lora_B" in n)
        for n, w in one.items():
            torch.testing.assert_close(together[n], w, atol=1e-5, rtol=1e-4)
        for p in probes:
            assert report.loss_after[p.id] != pytest.approx(report.loss_before[p.id], abs=1e-4)
            assert report.loss_before[p.id] == pytest.approx(report_one.loss_before[p.id], abs=1e-5)
            assert report.loss_after[p.id] == pytest.approx(report_one.loss_after[p.id], abs=1e-5)


def test_fitting_together_falls_back_to_one_by_one_for_layers_it_cannot_stack(tiny_model, planted):
    """LoRA on the token embeddings is not a stacked linear layer: probes are then fitted one at a time."""
    from hf_mirror.probes import Probe

    _, tok = tiny_model
    model = _models(tok)["gpt2"]
    probes = [Probe(p["id"], p["prompt"], fact[len(p["prompt"]) :])
              for p, fact in zip(planted.probes()[:3], planted.facts[:3], strict=True)]
    base = {"fit": "steps", "target_modules": ["wte", "c_attn"], "steps": 2, "lr": 1e-2, "rank": 4}
    one, _ = _fit(model, tok, probes, ["a0", "a1", "a2"], MirrorConfig(fit_batch=1, **base))
    together, _ = _fit(model, tok, probes, ["a0", "a1", "a2"], MirrorConfig(fit_batch=2, **base))
    assert one.keys() == together.keys()
    assert any("lora_embedding_A" in n and float(w.abs().max()) > 1e-4 for n, w in one.items())  # trained too
    for n, w in one.items():
        torch.testing.assert_close(together[n], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fit", ["steps", "gradient"])
def test_grouped_scan_stacks_the_embedding_tables(tiny_model, planted, tmp_path, fit):
    """LoRA on the token and position tables is stacked too (the positions, shared by every row, are read per row):
    several probes per forward give the scores of one probe at a time."""
    from hf_mirror.mirror import fit_mirrors
    from hf_mirror.probes import Probe
    from hf_mirror.stacked import StackedLora

    _, tok = tiny_model
    model = _models(tok)["gpt2"]
    pairs = zip(planted.probes()[:3], planted.facts[:3], strict=True)
    probes = [{**p, "completion": fact[len(p["prompt"]) :]} for p, fact in pairs]
    mirror = MirrorConfig(fit=fit, target_modules=["wte", "wpe", "c_attn"], steps=2, lr=1e-2, rank=4,
                          precondition="none" if fit == "gradient" else "rms")
    peft_model, _ = fit_mirrors(model, tok, [Probe("p", "a b", " c")], ["m"], mirror, show_progress=False)
    assert StackedLora.supports(peft_model, "m")
    peft_model.unload()

    def run(name, group):
        scan = ScanConfig(windows=WindowConfig(max_length=24, overlap=4, batch_size=4),
                          scoring=ScoringConfig(normalize="none", read="forward"),
                          ranking=RankingConfig(rank_by="mirror"),
                          speed=SpeedConfig(cache=False, adapters_per_forward=group))
        return attribute(model, planted.texts[:10], probes, tokenizer=tok, output_dir=tmp_path / name,
                         show_progress=False, mirror=mirror, scan=scan).scores().sort_values(["probe_id", "doc_id"])

    plain, grouped = run("plain", 1), run("grouped", 2)
    np.testing.assert_allclose(plain["raw_score"], grouped["raw_score"], atol=1e-5)
    assert np.abs(plain["raw_score"]).max() > 1e-4


def test_fitting_together_halves_the_group_when_out_of_memory(tiny_model, planted, monkeypatch):
    """A group that runs out of memory (after moving its weights) is reset and fitted in halves: same adapters."""
    from hf_mirror import mirror as mirror_mod
    from hf_mirror.probes import Probe

    _, tok = tiny_model
    model = _models(tok)["gpt2"]
    probes = [Probe(p["id"], p["prompt"], fact[len(p["prompt"]) :])
              for p, fact in zip(planted.probes()[:5], planted.facts[:5], strict=True)]
    names = [f"m{i}" for i in range(5)]
    base = {"fit": "steps", "target_modules": None, "steps": 2, "lr": 1e-2, "rank": 4}
    one, _ = _fit(model, tok, probes, names, MirrorConfig(fit_batch=1, **base))
    real, sizes = mirror_mod._fit_group, []

    def fit_or_run_out(peft_model, group, group_names, *args):
        sizes.append(len(group_names))
        real(peft_model, group, group_names, *args)
        if len(group_names) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(mirror_mod, "_fit_group", fit_or_run_out)
    halved, _ = _fit(model, tok, probes, names, MirrorConfig(fit_batch=4, **base))
    assert sizes == [4, 2, 2, 1]  # 4 failed, then 2 + 2; the fifth probe keeps the size that fits
    for n, w in one.items():
        torch.testing.assert_close(halved[n], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_linear_mirrors_on_the_top_blocks_adapt_attention_and_mlp_there_only(tiny_model, planted, arch):
    """``--layers -2 -1 --target-modules all-linear``: the top 2 blocks' attention and MLP, the trunk below once."""
    from hf_mirror.probes import Probe

    _, tok = tiny_model
    model = _models(tok)[arch]
    probes = [Probe(p["id"], p["prompt"], fact[len(p["prompt"]) :])
              for p, fact in zip(planted.probes()[:2], planted.facts[:2], strict=True)]
    # as the CLI passes them
    cfg = MirrorConfig(fit="steps", layers=[-2, -1], target_modules=["all-linear"], steps=2, lr=1e-2)
    calls = []
    handle = find_blocks(model)[0].register_forward_pre_hook(lambda *a: calls.append(1))
    weights, _ = _fit(model, tok, probes, ["p0", "p1"], cfg)
    handle.remove()
    assert len(calls) == 1  # the trunk below block 2 ran once for the group
    adapted = {n.split(".lora_")[0].split("base_model.model.")[-1] for n in weights}
    mlp = {"gpt2": ("mlp.c_fc", "mlp.c_proj"), "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}[arch]
    blocks = {"gpt2": "transformer.h", "llama": "model.layers"}[arch]
    assert all(n.startswith((f"{blocks}.2.", f"{blocks}.3.")) for n in adapted)
    assert all(f"{blocks}.{i}.{m}" in adapted for i in (2, 3) for m in mlp)


def test_auto_group_fills_the_logits_budget(tiny_model, planted, tmp_path):
    """adapters_per_forward=0 (the default): every probe per pass for a small vocabulary, one for gpt2-small's at
    full width; the scores are those of one probe per pass."""
    from hf_mirror.scan import LOGITS_BUDGET, Scanner

    _, tok = tiny_model
    model = _models(tok)["gpt2"]
    assert Scanner.auto_group(model, 40, 8, 128) == min(40, LOGITS_BUDGET // (8 * 128 * len(tok))) > 1
    assert Scanner.auto_group(model, 2, 8, 128) == 2  # never more than there are probes
    big = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=8, n_embd=4, n_layer=1, n_head=1))
    assert Scanner.auto_group(big, 40, 8, 1024) == 1 and LOGITS_BUDGET < 8 * 1024 * 50257
    pairs = zip(planted.probes()[:3], planted.facts[:3], strict=True)
    probes = [{**p, "completion": fact[len(p["prompt"]) :]} for p, fact in pairs]

    def run(name, group):
        scan = ScanConfig(windows=WindowConfig(max_length=24, overlap=4, batch_size=4),
                          scoring=ScoringConfig(normalize="none", read="forward"),
                          ranking=RankingConfig(rank_by="mirror"),
                          speed=SpeedConfig(cache=False, adapters_per_forward=group))
        result = attribute(model, planted.texts[:10], probes, tokenizer=tok, output_dir=tmp_path / name,
                           show_progress=False, scan=scan)
        return result.scores().sort_values(["probe_id", "doc_id"]), result.config["stats"]["forward_passes"]

    (one, passes_one), (auto, passes_auto) = run("one", 1), run("auto", 0)
    assert ScanConfig().speed.adapters_per_forward == 0 and passes_auto < passes_one
    np.testing.assert_allclose(one["raw_score"], auto["raw_score"], atol=1e-6)
