"""The gradient mirror (``MirrorConfig(fit="gradient")``) and the K-FAC / EK-FAC curvature that preconditions it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_mirror import InputError, MirrorConfig, RankingConfig, ScanConfig, SpeedConfig, attribute
from hf_mirror.curvature import (
    Curvature,
    capture,
    curvature_for,
    embedding_layers,
    fit_curvature,
    linear_layers,
    row_losses,
)
from hf_mirror.probes import Probe, encode_probe

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "birds sing in the tall green trees",
         "rain falls on the old roof again", "the old dog sat in the rain", "green trees sing"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()


def _grads(model, batch: dict, head: bool = False, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The loss's gradient for every linear layer's weight, [out, in] (and with ``embeddings`` each embedding table's),
    by autograd on the weights themselves."""
    layers = linear_layers(model, head=head) | (embedding_layers(model) if embeddings else {})
    weights = [m.weight for m in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    return {n: g.T if isinstance(m, Conv1D) else g for (n, m), g in zip(layers.items(), grads, strict=True)}


def _probe_batch(tok, probe: Probe) -> dict:
    return encode_probe(tok, probe)


def _doc_batch(tok, text: str) -> dict:
    from hf_mirror.corpus import document_tokens

    ids = torch.tensor([document_tokens(tok, text)])
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("adapted", ["blocks", "head", "embeddings"])
def test_a_small_gradient_step_reads_the_gradient_inner_product_by_forward_passes(tok, model, tmp_path, adapted):
    """Linear regime: each document's mirror score is step_rise x <g_doc, g_probe> / <g_probe, g_probe> (every linear
    layer of the blocks; and the output layer; and the token and position embedding tables; a rank high enough to
    hold the probe's gradient exactly)."""
    head, embeddings = adapted != "blocks", adapted == "embeddings"
    if head:  # an output layer of its own (a tied one's gradient also holds the input embedding's)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**{**model.config.to_dict(), "tie_word_embeddings": False})).eval()
    probe = Probe("p", "the cat", " sat on the mat")
    targets = {"blocks": "all-linear", "head": ["all-linear", "lm_head"],
               "embeddings": ["all-linear", "lm_head", "embeddings"]}[adapted]
    cfg = MirrorConfig(fit="gradient", target_modules=targets, rank=32, step_rise=1e-3, precondition="none")
    corpus = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    # a copy: attribute gives a tokenizer without one a pad token, and ``tok`` is shared by the whole session
    result = attribute(model, corpus, [probe], tokenizer=copy.deepcopy(tok), output_dir=tmp_path / "run", mirror=cfg,
                       scan=ScanConfig(ranking=RankingConfig(rank_by="mirror", top_k=len(TEXTS)),
                                       speed=SpeedConfig(cache=False)), show_progress=False)
    scores = result.scores().set_index("doc_id")["score"]
    g_probe = _grads(model, _probe_batch(tok, probe), head, embeddings)
    norm = sum((g * g).sum() for g in g_probe.values())
    expected = []
    for text in TEXTS:
        g_doc = _grads(model, _doc_batch(tok, text), head, embeddings)
        assert ("lm_head" in g_doc) == head and ("transformer.wpe" in g_doc) == embeddings
        expected.append(float(1e-3 * sum((g_doc[n] * g_probe[n]).sum() for n in g_probe) / norm))
    got = np.array([scores[str(i)] for i in range(len(TEXTS))])
    expected = np.array(expected)
    assert np.corrcoef(got, expected)[0, 1] > 0.999
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=2e-3 * np.abs(expected).max())
    record = result.probe_records[0]
    assert record["probe_loss_after"] - record["probe_loss_before"] == pytest.approx(1e-3, rel=0.05)


def test_kfac_inverts_its_own_factors(tok, model):
    """K-FAC's preconditioner undoes A (x) G: precondition(G X A) = X, up to a small damping, for any X in the span of
    the factors' leading eigenvectors."""
    texts = TEXTS * 2
    curvature = fit_curvature(model, tok, texts, max_length=64, kind="kfac")
    layers = linear_layers(model)
    # A and G computed here independently, from one pass per document
    a = {n: 0.0 for n in layers}
    g = {n: 0.0 for n in layers}
    tokens = 0
    for text in texts:
        batch = _doc_batch(tok, text)
        with capture(model, layers) as seen:
            row_losses(model, batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["labels"]).sum().backward()
        tokens += batch["input_ids"].shape[1]
        for n in layers:
            x, d = seen[n]["x"][0].double(), seen[n]["d"][0].double()
            a[n], g[n] = a[n] + x.T @ x, g[n] + d.T @ d
    torch.manual_seed(1)
    name = "transformer.h.1.mlp.c_fc"
    x = torch.randn(g[name].shape[0], a[name].shape[0], dtype=torch.float64)
    # well-conditioned directions only: project X onto the top eigenvectors of both factors
    layer = curvature.layers[name]
    top_out, top_in = layer.q_out[:, -8:].double(), layer.q_in[:, -8:].double()
    x = top_out @ top_out.T @ x @ top_in @ top_in.T
    product = (g[name] / tokens) @ x @ (a[name] / tokens)
    back = curvature.precondition(name, product.float(), damping=1e-4).double()
    assert (back - x).norm() / x.norm() < 0.05
    undamped = curvature.precondition(name, torch.zeros_like(product).float(), damping=0.0)
    assert torch.isfinite(undamped).all()  # directions without curvature carry no step, not NaN


def test_ekfac_scales_are_the_second_moments_of_the_window_gradients(tok, model):
    curvature = fit_curvature(model, tok, TEXTS, max_length=64, kind="ekfac")
    name = "transformer.h.0.attn.c_attn"
    layer = curvature.layers[name]
    moments = 0.0
    for text in TEXTS:
        batch = _doc_batch(tok, text)
        g = _grads(model, {**batch})[name]
        moments = moments + (layer.q_out.T @ g @ layer.q_in) ** 2
    assert torch.allclose(layer.scale, moments / len(TEXTS), rtol=1e-3, atol=1e-6 * float(layer.scale.max()))


def test_rms_scales_are_the_gradient_rms_and_precondition_divides_by_them(tok, model, tmp_path):
    curvature = fit_curvature(model, tok, TEXTS, max_length=64, kind="rms")
    name = "transformer.h.1.mlp.c_proj"
    layer = curvature.layers[name]
    moments = sum(_grads(model, _doc_batch(tok, text))[name] ** 2 for text in TEXTS)
    assert torch.allclose(layer.scale, (moments / len(TEXTS)).sqrt(), rtol=1e-3, atol=1e-6 * float(layer.scale.max()))
    grad = torch.randn(layer.scale.shape)
    expected = grad / (layer.scale + 0.1 * layer.scale.mean())
    assert torch.allclose(curvature.precondition(name, grad, damping=0.1), expected)
    curvature.save(tmp_path / "rms")
    again = Curvature.load(tmp_path / "rms")
    assert again.kind == "rms" and torch.equal(again.precondition(name, grad, 0.1), expected)
    # the position table (not tied to the output layer): the RMS of each entry's gradient, and an embedding's
    # compact gradient (its rows only) preconditioned row by row
    positions = curvature.layers["transformer.wpe"]
    moments = sum(_grads(model, _doc_batch(tok, text), embeddings=True)["transformer.wpe"] ** 2 for text in TEXTS)
    assert torch.allclose(positions.scale, (moments / len(TEXTS)).sqrt(), rtol=1e-3,
                          atol=1e-6 * float(positions.scale.max()))
    rows, part = torch.tensor([0, 3]), torch.randn(2, positions.scale.shape[1])
    full = torch.zeros(positions.scale.shape)
    full[rows] = part
    assert torch.allclose(curvature.precondition("transformer.wpe", part, 0.1, rows),
                          curvature.precondition("transformer.wpe", full, 0.1)[rows])


def test_the_curvature_is_cached_and_read_back(tok, model, tmp_path):
    from hf_mirror.corpus import Corpus

    corpus = Corpus([{"id": i, "text": t} for i, t in enumerate(TEXTS)], id_column="id")
    first = curvature_for(model, tok, corpus, "ekfac", 4, 64, tmp_path)
    [stored] = list((tmp_path / "curvature").iterdir())
    again = Curvature.load(stored)
    assert again.kind == "ekfac" and again.documents == first.documents == 4
    for n, layer in first.layers.items():
        assert torch.equal(layer.scale, again.layers[n].scale)
    assert curvature_for(model, tok, corpus, "ekfac", 4, 64, tmp_path).layers.keys() == first.layers.keys()


def test_config_of_the_gradient_fit(caplog):
    assert "fit" not in MirrorConfig(fit="steps").identity()  # the keys of step-fitted runs are unchanged
    assert "steps" not in MirrorConfig().identity()  # the default gradient fit reads no optimizer setting
    gradient = MirrorConfig(fit="gradient", precondition="ekfac")
    assert gradient.identity()["precondition"] == "ekfac" and "steps" not in gradient.identity()
    assert gradient.identity() != MirrorConfig(fit="gradient", precondition="ekfac", damping=0.2).identity()
    with caplog.at_level("WARNING", logger="hf_mirror.config"):
        MirrorConfig(fit="steps")  # the default preconditioner is the gradient fit's: nothing to say
        assert not caplog.records
        MirrorConfig(fit="steps", precondition="kfac")  # a preconditioned *gradient* step: not read
    assert "--precondition shape the gradient mirror's step and are not read by fit='steps'" in caplog.text
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="step_rise"):
            MirrorConfig(fit="gradient", step_rise=bad)
    with pytest.raises(InputError, match="lr > 0"):
        MirrorConfig(fit="steps", lr=float("nan"))
