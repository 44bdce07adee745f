"""The linear read (hf_mirror/linear_read.py): every mirror's first-order loss change from one forward and one backward
pass equals the forward read's loss change in the small-step limit, on linear layers, the output layer and embedding
tables, across windows and batches; and a run read linearly ranks and explains its documents as a forward-read run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_mirror import InputError, MirrorConfig, RankingConfig, ScanConfig, ScoringConfig, SpeedConfig, attribute
from hf_mirror.linear_read import LinearRead
from hf_mirror.probes import Probe
from hf_mirror.scan import Scanner

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the fox keeps a red lantern by the quiet harbour",
         "a wet owl sleeps in the cold north tower at night and dreams of the warm south wind over the sea",
         "rain", "the cat sat on the mat", "birds sing in the tall green trees"]


@pytest.fixture(scope="module")
def mirrors(tok):
    """A float64 2-block GPT-2 (untied output layer) with three LoRA adapters on every kind of layer the default
    mirror adapts (attention and MLP linear layers, the output layer, the token and position tables), random A and B,
    at a tiny scaling: the forward read's loss change is then its first-order term."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_mirror.mirror import quiet_peft

    tokenizer = copy.deepcopy(tok)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       tie_word_embeddings=False)).double().eval()
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc", "mlp.c_proj", "lm_head", "wte", "wpe"],
                        fan_in_fan_out=True)
    with quiet_peft():
        peft_model = get_peft_model(model, config, adapter_name="m0")
        for name in ("m1", "m2"):
            peft_model.add_adapter(name, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 1.0)
        for m in peft_model.modules():
            if hasattr(m, "scaling") and isinstance(m.scaling, dict):
                for k in m.scaling:
                    m.scaling[k] = 1e-5
    return peft_model.eval(), tokenizer


def _scan(mirrors, read: str, **kwargs):
    model, tokenizer = mirrors
    names = ["m0", "m1", "m2"]
    linear = LinearRead(model, names) if read == "linear" else None
    scanner = Scanner(model, tokenizer, adapter_names=names, probe_ids=["p0", "p1", "p2"], linear=linear,
                      **{"max_length": 64, "overlap": 8, "batch_size": 2, **kwargs})
    return list(scanner(list(enumerate(TEXTS))))


def _set_scaling(model, value: float) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "scaling", None), dict):
            for k in m.scaling:
                m.scaling[k] = value


def test_the_linear_read_is_the_derivative_of_each_rows_scored_loss(mirrors):
    """On a padded batch with a context prefix: the linear read's change for row b and mirror g equals the derivative
    of row b's summed scored loss along mirror g's update, by central differences in float64 (to 1e-6 relative)."""
    from hf_mirror.scan import collate, token_losses

    model, tokenizer = mirrors
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    ids, mask = collate(seqs, tokenizer.pad_token_id, "cpu")
    scored = torch.zeros(len(seqs), ids.shape[1] - 1, dtype=torch.float64)
    for i, s in enumerate(seqs):
        scored[i, min(2, len(s) - 2) : len(s) - 1] = 1  # the first tokens are context, the padding is not scored
    base, delta = LinearRead(model, ["m0", "m1", "m2"])(ids, mask, scored)
    eps = 1e-6
    expected = torch.zeros_like(delta, dtype=torch.float64)
    with torch.no_grad():
        for g, name in enumerate(["m0", "m1", "m2"]):
            model.set_adapter(name)
            sums = []
            for sign in (1, -1):
                _set_scaling(model, sign * eps)
                logits = model(input_ids=ids, attention_mask=mask).logits
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                           reduction="none")
                sums.append((losses * scored).sum(dim=1))
            expected[:, g] = (sums[0] - sums[1]) / (2 * eps) * 1e-5
    _set_scaling(model, 1e-5)
    model.set_adapter("m0")
    assert delta.shape == (3, 3)
    np.testing.assert_allclose(delta.double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-12)
    with torch.no_grad(), model.disable_adapter():
        plain = token_losses(model, ids, mask)
    np.testing.assert_allclose(base.numpy(), plain.numpy(), rtol=1e-6)


@pytest.mark.parametrize("windowing", [{}, {"max_length": 8, "overlap": 3, "batch_size": 3}])
def test_the_scans_linear_read_is_its_forward_reads_loss_change_to_first_order(mirrors, windowing):
    """Per document and mirror, the summed token-loss change under a tiny LoRA update: the scan's linear read matches
    its forward read (documents split into many windows included) up to the forward read's float32 rounding, and the
    base losses are the same."""
    forward, linear = _scan(mirrors, "forward", **windowing), _scan(mirrors, "linear", **windowing)
    assert [d.doc_id for d in forward] == [d.doc_id for d in linear] == list(range(len(TEXTS)))
    exact = np.stack([(d.mirror - d.base).sum(axis=1) for d in forward])
    first_order = np.stack([d.delta for d in linear])
    assert all(d.mirror is None for d in linear)
    np.testing.assert_allclose(np.concatenate([d.base for d in linear]), np.concatenate([d.base for d in forward]),
                               rtol=1e-6)
    assert np.abs(exact).min() > 0  # every mirror moves every document
    np.testing.assert_allclose(first_order, exact, atol=0.01 * np.abs(exact).max())
    assert np.corrcoef(first_order.ravel(), exact.ravel())[0, 1] > 0.9999


def test_the_linear_read_packs_short_windows_into_fuller_batches(mirrors):
    """Short windows share a pass while the batch's padded area stays within batch_size full windows: fewer passes,
    the same base losses and first-order changes as batches of batch_size windows (fixed width: no packing)."""
    model, tokenizer = mirrors
    names = ["m0", "m1", "m2"]

    def scan(**kwargs):
        scanner = Scanner(model, tokenizer, adapter_names=names, probe_ids=names, linear=LinearRead(model, names),
                          max_length=64, overlap=8, batch_size=2, sort_batches=8, **kwargs)
        return list(scanner(list(enumerate(TEXTS * 4)))), scanner.forward_passes

    packed, passes = scan()
    plain, plain_passes = scan(fixed_width=True)
    assert plain_passes == 10 and passes < plain_passes  # 20 one-window documents: 10 batches of 2 unpacked
    # float32 sums in another order: equal to float32 rounding
    np.testing.assert_allclose(np.stack([d.delta for d in packed]), np.stack([d.delta for d in plain]), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([d.base for d in packed]), np.concatenate([d.base for d in plain]),
                               rtol=1e-6)


def test_every_adapted_kind_of_layer_is_read(mirrors):
    """The blocks' linear layers, the output layer and the token and position tables: with one kind's update alone
    (every other B set to 0), the linear read still matches the forward read, and it is not zero."""
    model, _ = mirrors
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n}
    try:
        for kind in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj", "lm_head", "wte", "wpe"):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n] if kind in n else torch.zeros_like(p))
            exact = np.stack([(d.mirror - d.base).sum(axis=1) for d in _scan(mirrors, "forward")])
            first_order = np.stack([d.delta for d in _scan(mirrors, "linear")])
            assert np.abs(first_order).max() > 0, kind
            np.testing.assert_allclose(first_order, exact, atol=0.05 * np.abs(exact).max(), err_msg=kind)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_a_run_read_linearly_ranks_and_explains_as_a_forward_run(tiny_model, tmp_path):
    """Through ``attribute``: the default mirror read both ways gives the same ranking (raw scores within 2% of the
    largest), and the linearly read run still has each top document's token evidence, from forward passes under the
    probe's own mirror."""
    model, tok = tiny_model
    probes = [Probe("p0", "the cat", " sat on the mat"), Probe("p1", "birds sing", " in the tall green trees")]
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS * 2)]
    runs = {}
    for read in ("forward", "linear"):
        runs[read] = attribute(model, corpus, probes, tokenizer=copy.deepcopy(tok), output_dir=tmp_path / read,
                               mirror=MirrorConfig(precondition="none"),
                               scan=ScanConfig(scoring=ScoringConfig(read=read),
                                               ranking=RankingConfig(rank_by="mirror", top_k=3),
                                               speed=SpeedConfig(cache=False)),
                               show_progress=False)
    scores = {read: r.scores().sort_values(["probe_id", "doc_id"]) for read, r in runs.items()}
    exact, first_order = scores["forward"]["raw_score"].to_numpy(), scores["linear"]["raw_score"].to_numpy()
    np.testing.assert_allclose(first_order, exact, atol=0.02 * np.abs(exact).max())
    for pid in ("p0", "p1"):
        top = {read: r.topk[r.topk["probe_id"] == pid]["doc_id"].tolist() for read, r in runs.items()}
        assert top["linear"][0] == top["forward"][0]
        evidence = runs["linear"].evidence
        for doc in top["linear"]:
            rows = evidence[(evidence["probe_id"] == pid) & (evidence["doc_id"] == doc)]
            assert len(rows) > 0 and np.isfinite(rows["delta"]).all()
    assert runs["linear"].config["scan"]["read"] == "linear"
    forward = runs["forward"]  # the forward read keeps each token's exact change: its mean is the document's score
    best = forward.topk.iloc[0]
    deltas = forward.token_deltas(best["probe_id"], best["doc_id"])
    assert deltas["delta"].mean() == pytest.approx(best["raw_score"], abs=1e-6)


def test_the_linear_read_refuses_what_it_cannot_read(tiny_model, tmp_path):
    """Step-fitted mirrors (far from the linear regime) and the max aggregate (a per-token statistic) are refused
    before anything is fitted; ``auto`` reads them by forward passes instead."""
    model, tok = tiny_model
    probe = Probe("p0", "the cat", " sat on the mat")
    corpus = [{"id": "d0", "text": TEXTS[0]}]
    for mirror, scan in ((MirrorConfig(fit="steps"), ScanConfig(scoring=ScoringConfig(read="linear"))),
                         (MirrorConfig(precondition="none"),
                          ScanConfig(scoring=ScoringConfig(read="linear", aggregate="max")))):
        with pytest.raises(InputError, match="--read linear"):
            attribute(model, corpus, [probe], tokenizer=copy.deepcopy(tok), output_dir=tmp_path / "x",
                      mirror=mirror, scan=scan, show_progress=False)
    assert not (tmp_path / "x").exists()
    from hf_mirror.pipeline import resolve_read

    assert resolve_read(MirrorConfig(fit="steps"), ScanConfig(scoring=ScoringConfig(read="auto"))) == "forward"
    assert resolve_read(MirrorConfig(), ScanConfig(scoring=ScoringConfig(read="auto"))) == "linear"
    assert resolve_read(MirrorConfig(), ScanConfig(scoring=ScoringConfig(read="auto", aggregate="max"))) == "forward"
