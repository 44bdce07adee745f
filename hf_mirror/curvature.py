"""Curvature of the linear layers for the preconditioned mirror: K-FAC and EK-FAC factors, fitted once per model
on a corpus sample and cached.

For a linear layer ``y = W x`` a document's gradient is ``sum_t d_t x_t^T`` (``d_t`` the gradient of its loss with
respect to the layer's output at token t). K-FAC approximates the layer's Fisher block by ``A (x) G`` with
``A = E[x x^T]`` and ``G = E[d d^T]``; in their eigenbases ``Q_A``, ``Q_G`` the inverse is a division by the
products of eigenvalues. EK-FAC (George et al., 2018) divides instead by the second moments of the documents'
gradients expressed in that basis, which fit the diagonal exactly. ``precondition(g)`` applies the damped inverse
to a gradient: ``Q_G [(Q_G^T g Q_A) / (S + damping x mean(S))] Q_A^T``. ``rms`` keeps the layer's own basis and
divides each weight's gradient by the root mean square of the documents' gradients for that weight (Adam's
normaliser, with the sample's gradients in place of the optimizer's history).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_mirror.errors import InputError, ScoreError
from hf_mirror.probes import IGNORE_INDEX

logger = logging.getLogger(__name__)

KINDS = ("none", "kfac", "ekfac", "rms")
FORMAT = "hf_mirror-curvature-v1"
MAX_HEAD_VOCAB = 8192  # the output layer's curvature (vocabulary^2 entries) is fitted up to this vocabulary


def linear_layers(model, head: bool = True) -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear`` or GPT-2's ``Conv1D``) inside the model's transformer blocks and, with
    ``head``, the output layer (LM head), by qualified name in ``model`` (PEFT's ``base_layer`` of an adapted layer
    is named as the layer itself)."""
    from transformers.pytorch_utils import Conv1D

    from hf_mirror.trunk import find_blocks

    inside = {id(m) for m in find_blocks(model).modules()}
    output = model.get_output_embeddings()
    if head and output is not None:
        inside |= {id(m) for m in output.modules()}
    out = {}
    for name, module in model.named_modules():
        if id(module) in inside and isinstance(module, (nn.Linear, Conv1D)) and "lora_" not in name:
            out[plain_name(name)] = module
    return out


def embedding_layers(model) -> dict[str, nn.Module]:
    """The embedding tables outside the transformer blocks (tokens and, for GPT-2-style models, positions), by
    qualified name in ``model``: what ``--target-modules embeddings`` adapts."""
    from hf_mirror.trunk import find_blocks

    inside = {id(m) for m in find_blocks(model).modules()}
    return {plain_name(name): m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and id(m) not in inside and "lora_" not in name}


def embedding_gradient(ids: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's gradient for an embedding table, compactly: the distinct ids ``rows`` and the gradient's rows
    for them [rows, dim] (every other row of the table has zero gradient)."""
    rows, where = ids.unique(return_inverse=True)
    return rows, torch.zeros(len(rows), d.shape[-1], dtype=d.dtype, device=d.device).index_add_(0, where, d)


def plain_name(name: str) -> str:
    """A module's name in the model PEFT wrapped (``base_model.model.`` and ``.base_layer`` taken away)."""
    return name.removeprefix("base_model.model.").removesuffix(".base_layer")


@contextmanager
def capture(model, layers: dict[str, nn.Module]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record every layer's inputs ``x`` [batch, length, in] and output gradients ``d`` [batch, length, out] of the
    next forward and backward pass of ``model`` (the model's own weights need not require grad)."""
    seen: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}

    from hf_mirror.stacked import BatchRows

    rows = BatchRows()

    def record(name: str):
        def hook(module, args, out):
            seen[name]["x"] = args[0].detach()
            if isinstance(module, nn.Embedding):
                # a table's output: the gradient is read here, one row per sequence (positions are shared)
                n = rows.n or out.shape[0]
                seen[name]["x"] = args[0].detach().expand(n, *args[0].shape[1:])
                out = out.detach().expand(n, *out.shape[1:]).clone().requires_grad_(True)
            if out.requires_grad:
                out.register_hook(lambda g: seen[name].__setitem__("d", g.detach()))
            return out
        return hook

    def leaf(module, args, out):  # gradients flow through the blocks even with frozen weights
        return out if out.requires_grad else out.detach().requires_grad_(True)

    handles = [model.register_forward_pre_hook(rows, with_kwargs=True)]
    handles += [m.register_forward_hook(record(n)) for n, m in layers.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    try:
        with torch.enable_grad():
            yield seen
    finally:
        for h in handles:
            h.remove()


def row_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token loss over its labelled positions (``labels`` aligned with ``input_ids``)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    target = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.sum(dim=1) / (target != IGNORE_INDEX).sum(dim=1).clamp(min=1)


@dataclass
class LayerCurvature:
    """One layer's eigenbases and the (EK-FAC or K-FAC) scale of each eigen-direction [out, in]; for ``rms`` the
    bases are empty (the layer's own basis) and the scale is each weight's gradient RMS."""

    q_in: torch.Tensor
    q_out: torch.Tensor
    scale: torch.Tensor

    def precondition(self, grad: torch.Tensor, damping: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The damped inverse applied to ``grad`` [out, in] (or a stack of them [..., out, in]); ``rows``: ``grad``
        holds only those rows of the layer's (an embedding table's compact gradient; RMS only)."""
        rotate = self.q_in.numel() > 0
        if rows is not None and rotate:
            raise InputError("Only the rms curvature preconditions an embedding table.")
        rotated = self.q_out.T @ grad.to(self.q_in.dtype) @ self.q_in if rotate else grad.to(self.scale.dtype)
        scale = self.scale if rows is None else self.scale[rows.to(self.scale.device)]
        denominator = scale + damping * self.scale.mean()
        # directions with no curvature at all (no damping) carry no step rather than a division by zero
        scaled = torch.where(denominator > 0, rotated / denominator.clamp(min=torch.finfo(rotated.dtype).tiny), 0.0)
        return self.q_out @ scaled @ self.q_in.T if rotate else scaled


@dataclass
class Curvature:
    """Every linear layer's :class:`LayerCurvature`, by plain module name, and how they were fitted."""

    kind: str
    layers: dict[str, LayerCurvature]
    documents: int

    def precondition(self, name: str, grad: torch.Tensor, damping: float,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        try:
            layer = self.layers[plain_name(name)]
        except KeyError:
            raise InputError(f"No curvature for layer {plain_name(name)!r}: the factors were fitted for "
                             f"{sorted(self.layers)[:4]}...; adapt linear layers inside the blocks only.") from None
        return layer.precondition(grad, damping, rows)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from hf_mirror.integrity import atomic_write

        tensors = {f"{n}.{part}": getattr(c, part).contiguous() for n, c in self.layers.items()
                   for part in ("q_in", "q_out", "scale")}
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "factors.safetensors"))
        atomic_write(path / "curvature.json", json.dumps({"format": FORMAT, "kind": self.kind,
                                                          "documents": self.documents,
                                                          "layers": sorted(self.layers)}).encode())

    @classmethod
    def load(cls, path: Path) -> Curvature:
        from safetensors.torch import load_file

        meta = json.loads((path / "curvature.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} directory")
        tensors = load_file(str(path / "factors.safetensors"))
        layers = {n: LayerCurvature(*(tensors[f"{n}.{part}"] for part in ("q_in", "q_out", "scale")))
                  for n in meta["layers"]}
        return cls(meta["kind"], layers, meta["documents"])


def _windows(tokenizer, texts: Sequence[str], max_length: int, owners: list[int] | None = None
             ) -> list[tuple[list[int], int]]:
    """Every text's scan windows (ids, context tokens); ``owners`` gets each window's text index."""
    from hf_mirror.corpus import document_tokens, windows

    out = []
    for n, text in enumerate(texts):
        seq = document_tokens(tokenizer, text)
        if len(seq) > 1:
            parts = [(ids, ctx) for _, ids, ctx in windows(seq, max_length, max(1, max_length // 8))]
            out += parts
            if owners is not None:
                owners += [n] * len(parts)
    return out


def _batches(rows: list[tuple[list[int], int]], batch_size: int, pad_id: int, device) -> Iterator[dict]:
    """Right-padded batches of windows, each labelled after its ``ctx`` context tokens (the scan's collation)."""
    from hf_mirror.scan import collate

    for lo in range(0, len(rows), batch_size):
        part = rows[lo : lo + batch_size]
        ids, mask = collate([row for row, _ in part], pad_id, device)
        labels = ids.masked_fill(~mask.bool(), IGNORE_INDEX)
        for i, (_, ctx) in enumerate(part):
            labels[i, :ctx] = IGNORE_INDEX
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _passes(model, layers, rows, batch_size, pad_id, names: Sequence | None = None
            ) -> Iterator[tuple[dict, torch.Tensor]]:
    """Per batch of windows: the captured inputs and output gradients of each row's mean loss, and the mask; a
    non-finite loss is refused naming its document (``names``: each window's document id)."""
    device = next(model.parameters()).device
    for b, batch in enumerate(_batches(rows, batch_size, pad_id, device)):
        with capture(model, layers) as seen:
            losses = row_losses(model, **batch)
            bad = (~torch.isfinite(losses.detach())).nonzero()
            if len(bad):
                at = b * batch_size + int(bad[0, 0])
                who = repr(names[at]) if names is not None else f"window {at} of the sample"
                raise ScoreError(f"Non-finite token loss under the base model on document {who} (fitting the "
                                 "curvature); check the model's dtype and weights, or pass --precondition none.")
            losses.sum().backward()
        yield seen, batch["attention_mask"].bool()


@torch.no_grad()
def fit_curvature(model, tokenizer, texts: Sequence[str], max_length: int, kind: str = "ekfac",
                  batch_size: int = 8, ids: Sequence | None = None) -> Curvature:
    """K-FAC (``kind="kfac"``), EK-FAC or RMS factors of every linear layer in the blocks, from ``texts`` (a corpus
    sample; documents longer than ``max_length`` are windowed). Two passes for EK-FAC: the factors, then the
    second moments of each window's gradient in their eigenbases; one pass for RMS (those moments in the layer's
    own basis). ``ids`` (the texts' document ids) name a document whose loss is not finite."""
    if kind not in KINDS[1:]:
        raise InputError(f"curvature kind must be one of {KINDS[1:]}, got {kind!r}.")
    # the output layer's G is vocabulary x vocabulary: fitted only where that stays small
    head = (kind == "rms" or model.get_output_embeddings() is None
            or model.get_output_embeddings().weight.shape[0] <= MAX_HEAD_VOCAB)
    layers = linear_layers(model, head=head)
    if kind == "rms":
        layers |= embedding_layers(model)
    owners: list[int] = []
    rows = _windows(tokenizer, texts, max_length, owners)
    if not rows:
        raise InputError("The corpus sample for the curvature has no tokens.")
    names = [ids[o] for o in owners] if ids is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        if kind == "rms":
            bases = _rms(model, layers, rows, batch_size, pad_id, names)
        else:
            bases = _kronecker(model, layers, rows, batch_size, pad_id, names, kind)
    finally:
        model.train(was_training)
    return Curvature(kind, {n: LayerCurvature(*b) for n, b in bases.items()}, len(rows))


def _kronecker(model, layers, rows, batch_size, pad_id, names, kind: str) -> dict[str, tuple]:
    """K-FAC's eigenbases and eigenvalue products per layer; for EK-FAC a second pass replaces the products by the
    second moments of each window's gradient in those bases."""
    a = {n: 0.0 for n in layers}
    g = {n: 0.0 for n in layers}
    tokens = 0
    for seen, mask in _passes(model, layers, rows, batch_size, pad_id, names):
        tokens += int(mask.sum())
        for n in layers:
            x, d = seen[n]["x"][mask].double(), seen[n]["d"][mask].double()
            a[n] = a[n] + x.T @ x
            g[n] = g[n] + d.T @ d
    bases = {}
    for n in layers:
        ea, qa = torch.linalg.eigh(a[n] / tokens)
        eg, qg = torch.linalg.eigh(g[n] / tokens)
        bases[n] = (qa.float(), qg.float(), torch.outer(eg.clamp(min=0), ea.clamp(min=0)).float())
    if kind == "ekfac":
        second = {n: 0.0 for n in layers}
        for seen, mask in _passes(model, layers, rows, batch_size, pad_id, names):
            for n, (qa, qg, _) in bases.items():
                x, d = seen[n]["x"] * mask[..., None], seen[n]["d"]
                grads = torch.einsum("bto,bti->boi", d, x)
                second[n] = second[n] + ((qg.T @ grads @ qa) ** 2).sum(0)
        bases = {n: (qa, qg, second[n] / len(rows)) for n, (qa, qg, _) in bases.items()}
    return bases


def _rms(model, layers, rows, batch_size, pad_id, names=None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each layer's empty bases and the root mean square over windows of each weight's gradient ([out, in]; for an
    embedding table [entries, dim])."""
    second = {n: 0.0 if not isinstance(m, nn.Embedding) else torch.zeros(m.weight.shape, dtype=torch.float64)
              for n, m in layers.items()}
    for seen, mask in _passes(model, layers, rows, batch_size, pad_id, names):
        for n, m in layers.items():
            if isinstance(m, nn.Embedding):
                for ids, d, keep in zip(seen[n]["x"], seen[n]["d"].double(), mask, strict=True):
                    index, grad = embedding_gradient(ids[keep], d[keep])
                    second[n].index_add_(0, index.cpu(), (grad ** 2).cpu())
                continue
            x, d = seen[n]["x"] * mask[..., None], seen[n]["d"]
            second[n] = second[n] + (torch.einsum("bto,bti->boi", d.double(), x.double()) ** 2).sum(0)
    empty = torch.empty(0)
    return {n: (empty, empty, (v / len(rows)).sqrt().float()) for n, v in second.items()}


def corpus_sample(corpus, n_documents: int) -> list[tuple[object, str]]:
    """The ids and texts of the corpus's first ``n_documents`` non-empty documents (stream order); a document whose
    text is not a string is refused as the scan refuses it."""
    sample = []
    for doc_id, text in corpus.documents():
        if text is not None and not isinstance(text, str):
            raise InputError(f"Document {doc_id!r} has non-string text ({type(text).__name__}); point --text-column "
                             "at a string column.")
        if isinstance(text, str) and text.strip():
            sample.append((doc_id, text))
            if len(sample) == n_documents:
                break
    return sample


def curvature_for(model, tokenizer, corpus, kind: str, n_documents: int, max_length: int,
                  cache_dir: str | Path | None = None, weights: str | None = None, cache: bool = True) -> Curvature:
    """The curvature of ``model`` on the first ``n_documents`` documents of ``corpus``: from the cache when this
    model, tokenizer and sample were fitted before, else fitted and cached (under ``cache_dir``, default
    ``$HF_MIRROR_CACHE``; ``cache=False``: neither read nor written)."""
    import time

    from hf_mirror.cache import default_cache_dir, model_fingerprint, tokenizer_fingerprint
    from hf_mirror.ownership import writable

    sample = corpus_sample(corpus, n_documents)
    texts = [text for _, text in sample]
    key = hashlib.sha256(json.dumps([FORMAT, kind, weights or model_fingerprint(model),
                                     tokenizer_fingerprint(tokenizer), max_length, texts]).encode()).hexdigest()[:24]
    root = Path(cache_dir or default_cache_dir()) / "curvature" / key
    if cache and (root / "curvature.json").exists():
        try:
            return Curvature.load(root)
        except (ValueError, OSError, KeyError) as e:
            logger.warning("The cached curvature in %s is damaged (%s); fitting it again.", root, e)
    t0 = time.perf_counter()
    curvature = fit_curvature(model, tokenizer, texts, max_length, kind, ids=[doc_id for doc_id, _ in sample])
    logger.info("Fitted %s factors of %d layers on %d windows in %.1f s.", kind, len(curvature.layers),
                curvature.documents, time.perf_counter() - t0)
    if cache and writable(root.parent.parent):
        curvature.save(root)
    return curvature
