"""Small GPT-2-style language models trained from scratch on a list of documents, deterministically.

Used for the bundled demo model and by the tests: no Hub access needed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_mirror.modeling import quiet_defaults
from hf_mirror.progress import progress_bar

EOS = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2 style: EOS is the only special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=1024)


def train_tiny_lm(
    texts: Sequence[str],
    output_dir: str | Path | None = None,
    *,
    vocab_size: int = 1000,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 128,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Train a tokenizer and a GPT-2 model on ``texts`` (each document framed by EOS tokens).

    Deterministic for a given seed on CPU; saved in Hugging Face format when ``output_dir`` is given.
    """
    tokenizer = train_tokenizer(texts, vocab_size)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = fit_lm(texts, tokenizer, config, epochs=epochs, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, seed=seed, show_progress=show_progress)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def fit_lm(
    texts: Sequence[str],
    tokenizer,
    config: GPT2Config,
    *,
    keep: Sequence[bool] | None = None,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    show_progress: bool = False,
) -> GPT2LMHeadModel:
    """A GPT-2 of ``config`` trained from scratch on ``texts`` (AdamW, one-cycle schedule, clipping at 1).

    Each document is framed by EOS and cut to the context. ``keep`` (one flag per text) trains on a subset
    while keeping the data order of the full run: each epoch shuffles *all* texts and skips the left-out ones,
    so retrains on subsets differ from the full run only by the documents left out.
    """
    keep = [True] * len(texts) if keep is None else [bool(k) for k in keep]
    if len(keep) != len(texts):
        raise ValueError("keep needs one flag per text.")
    n_kept = sum(keep)
    if n_kept == 0:
        raise ValueError("Training needs at least one document.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    limit = config.n_positions - 2
    seqs = [[eos, *tokenizer(t, add_special_tokens=False)["input_ids"][:limit], eos] for t in texts]
    model = GPT2LMHeadModel(config)
    quiet_defaults(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n_kept / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = progress_bar(total=steps, desc="training tiny LM", disable=not show_progress)
    for _ in range(epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        order = [j for j in order if keep[j]]
        for i in range(0, len(order), batch_size):
            batch = [seqs[j] for j in order[i : i + batch_size]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), eos)
            labels = torch.full((len(batch), width), -100)
            for r, s in enumerate(batch):
                ids[r, : len(s)] = torch.tensor(s)
                labels[r, : len(s)] = torch.tensor(s)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model
