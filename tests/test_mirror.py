"""Mirrors fitted to a target rise of the probe loss (``MirrorConfig.target_rise``) instead of a fixed step count."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror import InputError, MirrorConfig
from hf_mirror.flags import add_config_flags, apply_overrides
from hf_mirror.probes import Probe

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "birds sing", "rain falls on the old roof again"]


pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = {"fit": "steps", "target_modules": None, "steps": 3}  # the step-fitted mirror on the attention


@pytest.fixture(scope="module")
def model_and_probes(tok):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    probes = [Probe(f"p{i}", t.split()[0], " " + " ".join(t.split()[1:])) for i, t in enumerate(TEXTS)]
    return model, probes


def _fit(model, tok, probes, cfg):
    from hf_mirror.mirror import fit_mirrors

    names = [f"m{i}" for i in range(len(probes))]
    peft_model, report = fit_mirrors(model, tok, probes, names, cfg, show_progress=False)
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    peft_model.unload()
    return weights, report


def _adapter(weights: dict, name: str) -> dict:
    return {k.replace(f".{name}.", ".*."): v for k, v in weights.items() if f".{name}." in k}


def test_config_validates_and_keys_the_target():
    assert MirrorConfig().target_rise is None
    assert "target_rise" not in MirrorConfig().identity()  # off: the keys of earlier runs are unchanged
    assert MirrorConfig(fit="steps", target_rise=1.0).identity()["target_rise"] == 1.0
    one, two = MirrorConfig(fit="steps", target_rise=1.0), MirrorConfig(fit="steps", target_rise=2.0)
    assert one.identity() != two.identity()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="target_rise"):
            MirrorConfig(target_rise=bad)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, MirrorConfig)
    assert apply_overrides(MirrorConfig(), parser.parse_args(["--target-rise", "0.5"])).target_rise == 0.5


@pytest.mark.parametrize("direction", ["unlearn", "learn"])
def test_each_probe_stops_at_its_target_and_fitting_together_gives_the_same_adapters(tok, model_and_probes,
                                                                                      direction):
    model, probes = model_and_probes
    target, cap = 0.3, 20
    base = {"fit": "steps", "target_modules": None, "steps": cap, "lr": 2e-2, "rank": 4, "target_rise": target,
            "direction": direction}
    sign = 1.0 if direction == "unlearn" else -1.0
    one, report_one = _fit(model, tok, probes, MirrorConfig(fit_batch=1, **base))
    together, report = _fit(model, tok, probes, MirrorConfig(fit_batch=4, **base))
    steps = [report.steps[p.id] for p in probes]
    assert steps == [report_one.steps[p.id] for p in probes]
    assert len(set(steps)) > 1 and min(steps) >= 1 and max(steps) <= cap  # probes stop at different steps
    for p in probes:  # stopped at the first step whose loss reached the target (or at the cap)
        rise = sign * (report.loss_after[p.id] - report.loss_before[p.id])
        assert rise >= target or report.steps[p.id] == cap
        assert report.loss_after[p.id] == pytest.approx(report_one.loss_after[p.id], abs=1e-5)
    for n, w in one.items():  # the probes that stopped early did not move while the others went on
        torch.testing.assert_close(together[n], w, atol=5e-5, rtol=1e-3)  # up to 20 Adam steps
    # a probe that stopped after k steps has the adapter of a plain k-step fit; k - 1 steps fell short
    for i, p in enumerate(probes):
        k = report.steps[p.id]
        plain_cfg = {**base, "target_rise": None}
        exact, plain = _fit(model, tok, [p], MirrorConfig(**{**plain_cfg, "steps": k}))
        for n, w in _adapter(exact, "m0").items():
            torch.testing.assert_close(_adapter(together, f"m{i}")[n], w, atol=5e-5, rtol=1e-3)
        _, short = _fit(model, tok, [p], MirrorConfig(**{**plain_cfg, "steps": k - 1}))
        assert sign * (short.loss_after[p.id] - short.loss_before[p.id]) < target
        assert plain.steps[p.id] == k


def test_without_a_target_every_mirror_takes_every_step(tok, model_and_probes):
    model, probes = model_and_probes
    _, report = _fit(model, tok, probes, MirrorConfig(**STEPS, lr=2e-2, rank=4, fit_batch=4))
    assert report.steps == {p.id: 3 for p in probes}
    huge, _ = _fit(model, tok, probes[:2], MirrorConfig(**STEPS, lr=2e-2, rank=4, fit_batch=2, target_rise=1e6))
    plain, _ = _fit(model, tok, probes[:2], MirrorConfig(**STEPS, lr=2e-2, rank=4, fit_batch=2))
    for n, w in plain.items():  # a target never reached: the plain fit
        torch.testing.assert_close(huge[n], w)


def test_wide_layers_take_a_randomized_svd_as_good_as_the_exact_one_and_independent_of_the_group():
    """From EXACT_SVD_MAX wide on, the gradient mirror's rank-r step comes from a seeded randomized SVD: its error is
    within 1% of the best rank-r approximation's on a noisy matrix (a low-rank part plus dense noise, like an
    RMS-preconditioned gradient), it gives a probe the same adapter alone or in a group, and the same on every call;
    below that width the SVD is exact."""
    from hf_mirror.mirror import EXACT_SVD_MAX, _best_rank

    torch.manual_seed(0)
    g, m, n, r = 3, 3 * EXACT_SVD_MAX, EXACT_SVD_MAX, 16
    a = torch.randn(g, m, 8) @ torch.randn(g, 8, n) + 0.5 * torch.randn(g, m, n)
    u, s, vh = _best_rank(a, r)
    full_u, full_s, full_vh = torch.linalg.svd(a, full_matrices=False)
    best = (a - full_u[..., :r] @ (full_s[..., :r, None] * full_vh[..., :r, :])).norm(dim=(1, 2))
    got = (a - u @ (s[..., None] * vh)).norm(dim=(1, 2))
    assert (got / best).max() < 1.01 and (got / best).min() >= 1 - 1e-6
    torch.testing.assert_close(s[:, :8], full_s[:, :8], rtol=1e-3, atol=0)  # the low-rank part's triples
    alone = _best_rank(a[1:2], r)
    for x, y in zip(alone, (u, s, vh), strict=True):
        torch.testing.assert_close(x[0], y[1], rtol=0, atol=0)
    for x, y in zip(_best_rank(a, r), (u, s, vh), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    small = a[:, : EXACT_SVD_MAX - 1, : EXACT_SVD_MAX - 1]
    _, s_small, _ = _best_rank(small, r)
    torch.testing.assert_close(s_small, torch.linalg.svdvals(small)[:, :r])
