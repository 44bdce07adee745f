"""Mirrors: one PEFT LoRA adapter per probe, fitted with a few optimizer steps on the probe loss."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from hf_mirror.config import DEFAULT_TARGETS, MirrorConfig
from hf_mirror.curvature import Curvature
from hf_mirror.errors import InputError, ScoreError
from hf_mirror.probes import IGNORE_INDEX, Probe, encode_probe
from hf_mirror.progress import progress_bar
from hf_mirror.stacked import StackedLora, adapters_off
from hf_mirror.trunk import SharedTrunk, find_blocks

logger = logging.getLogger(__name__)
GRADIENT_BUDGET = 2**27  # dense gradient entries [probes, out, in] a closed-form step holds at once (512 MB fp32)



@contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model in PEFT reads transformers' deprecated ``is_gradient_checkpointing``: that FutureWarning is
    PEFT's and transformers' business, not the user's, so it is ignored (only it, only here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # GPT-2's Conv1D projections need fan_in_fan_out, its output layer is a Linear that does not: PEFT sets it
        # per layer and says so
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to (True|False) but the target module is")
        # an adapted tied output layer: the mirror is never merged into the weights, so the tie stays as it is
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer")
        yield


def uses_conv1d(model) -> bool:
    """GPT-2-style models keep their projections in transformers' ``Conv1D`` (LoRA needs ``fan_in_fan_out``)."""
    from transformers.pytorch_utils import Conv1D

    return model is not None and any(isinstance(m, Conv1D) for m in model.modules())


def linear_module_names(model) -> list[str]:
    """The names (last component) of the linear layers inside the model's transformer blocks."""
    from transformers.pytorch_utils import Conv1D

    blocks = find_blocks(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def block_indices(cfg: MirrorConfig, model=None) -> list[int] | None:
    """``cfg.layers`` as block indices of ``model`` (negative ones counted from the top); None for all blocks."""
    if cfg.layers is None or all(i >= 0 for i in cfg.layers):
        return cfg.layers
    if model is None:
        raise InputError("Negative --layers count from the top block: the model is needed to resolve them.")
    n = len(find_blocks(model))
    resolved = sorted({i + n if i < 0 else i for i in cfg.layers})
    if not all(0 <= i < n for i in resolved):
        raise InputError(f"--layers {cfg.layers} is out of range for a model with {n} blocks.")
    return resolved


def lora_config(cfg: MirrorConfig, model=None) -> LoraConfig:
    """PEFT's LoRA config of ``cfg``'s mirrors. ``"all-linear"`` with ``layers`` needs ``model``: PEFT takes layer
    indices only with module names, so the names of the linear layers inside the transformer blocks are listed."""
    targets = cfg.target_modules
    if cfg.layers is not None and targets == list(DEFAULT_TARGETS):
        targets = ["all-linear"]  # the default's modules inside the chosen blocks (a shared trunk below them)
    if targets == "all-linear" and cfg.layers is not None or isinstance(targets, list) and "all-linear" in targets:
        if model is None:
            raise InputError("target_modules='all-linear' with layers or other modules needs the model to list its "
                             "linear layers.")
        extra = [t for t in targets if t != "all-linear"] if isinstance(targets, list) else []
        targets = linear_module_names(model) + extra
    if isinstance(targets, list) and "embeddings" in targets:
        from hf_mirror.curvature import embedding_layers

        if model is None:
            raise InputError("target_modules 'embeddings' needs the model to find its embedding tables.")
        targets = [t for t in targets if t != "embeddings"] + sorted(embedding_layers(model))
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=block_indices(cfg, model),
        fan_in_fan_out=uses_conv1d(model),
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class FitReport:
    """Probe loss before and after fitting each mirror, and the optimizer steps each mirror took (fewer than
    ``MirrorConfig.steps`` when it reached its ``target_rise`` sooner)."""

    loss_before: dict[str, float] = field(default_factory=dict)
    loss_after: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


def _adapter_params(model: PeftModel, name: str) -> list[torch.nn.Parameter]:
    """Adapter ``name``'s weights: ``...lora_A.<name>.weight`` in modules, ``...lora_embedding_A.<name>`` in
    parameter dicts."""
    return [p for n, p in model.named_parameters() if "lora_" in n and (f".{name}." in n or n.endswith(f".{name}"))]


def _make_optimizer(cfg: MirrorConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def _stack(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Probe encodings as one right-padded batch (labels -100 on padding): causal attention keeps each row's
    real tokens unaffected by the padding."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {"input_ids": torch.full((len(batches), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(batches), width), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((len(batches), width), dtype=torch.long)}
    for i, b in enumerate(batches):
        n = b["input_ids"].shape[1]
        out["input_ids"][i, :n], out["labels"][i, :n] = b["input_ids"][0], b["labels"][0]
        out["attention_mask"][i, :n] = 1
    return out


def _probe_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean token loss over its labelled tokens (what ``model(labels=...).loss`` gives one probe)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1)


def fit_mirrors(
    model,
    tokenizer,
    probes: Sequence[Probe],
    adapter_names: Sequence[str],
    cfg: MirrorConfig,
    max_length: int | None = None,
    show_progress: bool = True,
    curvature: Curvature | None = None,
) -> tuple[PeftModel, FitReport]:
    """Attach one LoRA adapter per probe (named ``adapter_names[i]``) and fit it on that probe alone.

    Every adapter starts from the same seeded initialisation (B = 0, so it starts as the identity),
    which makes a probe's mirror independent of the other probes and of their order. Up to ``cfg.fit_batch``
    probes are fitted together in one batch, one row per probe through its own adapter (stacked LoRA weights and
    batched matmuls); the sum of the rows' losses gives each adapter the gradient of its own probe alone and the
    optimizers update elementwise, so the adapters are the ones fitted one at a time. When ``cfg.layers`` leaves
    the lowest blocks unadapted, they run once per group of probes (a shared trunk) instead of once per step.
    With ``cfg.fit="gradient"`` each adapter is written in closed form instead (:func:`_write_gradient_step`;
    ``curvature`` preconditions it when ``cfg.precondition`` asks for it).
    """
    if cfg.fit == "gradient" and cfg.precondition != "none" and curvature is None:
        raise InputError(f"precondition={cfg.precondition!r} needs the curvature: pass curvature=curvature_for(...) "
                         "(hf_mirror.curvature), or precondition='none'.")
    device = next(model.parameters()).device
    lora = lora_config(cfg, model)
    # encode every probe first: bad input fails before the model is touched
    batches = [{k: v.to(device) for k, v in encode_probe(tokenizer, p, cfg.include_prompt, max_length).items()}
               for p in probes]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is never attended to
    peft_model: PeftModel | None = None
    report = FitReport()
    bar = progress_bar(total=len(probes), desc="fitting mirrors", unit="probe", disable=not show_progress)
    try:
        lo, size = 0, cfg.fit_batch
        while lo < len(probes):
            names = list(adapter_names[lo : lo + cfg.fit_batch])
            for name in names:
                peft_model = _attach(model, peft_model, name, lora, cfg.seed)
            if size > 1 and not StackedLora.supports(peft_model, names[0]):
                size = 1  # adapter layers the stacks do not implement (e.g. embeddings): one probe at a time
            group = list(range(lo, lo + len(names)))
            if cfg.fit == "gradient":
                _write_gradient_step(peft_model, [probes[i] for i in group], names,
                                     _stack([batches[i] for i in group], pad_id), cfg, report, curvature)
                bar.update(len(names))
                lo += len(names)
                continue
            size = _fit_groups(peft_model, [probes[i] for i in group], names, [batches[i] for i in group], cfg,
                               report, pad_id, size, bar)
            lo += len(names)
    except BaseException:
        if peft_model is not None:
            peft_model.unload()  # leave the caller's model as it was
        raise
    bar.close()
    peft_model.eval()
    return peft_model, report


def _fit_groups(peft_model: PeftModel, probes: Sequence[Probe], names: Sequence[str], batches: Sequence[dict],
                cfg: MirrorConfig, report: FitReport, pad_id: int, size: int, bar) -> int:
    """Fit the attached adapters ``names`` ``size`` probes at a time; out of memory, the group is restored to its
    initial weights and fitted in halves. Returns the group size that fits."""
    device = next(peft_model.parameters()).device
    i = 0
    while i < len(names):
        part = slice(i, i + size)
        params = [p for name in names[part] for p in _adapter_params(peft_model, name)]
        initial = [p.detach().clone() for p in params]
        batch = {k: v.to(device) for k, v in _stack(batches[part], pad_id).items()}
        try:
            _fit_group(peft_model, probes[part], names[part], batch, cfg, report, _trunk(peft_model, params, cfg))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            del batch
            with torch.no_grad():
                for p, init in zip(params, initial, strict=True):
                    p.copy_(init)
                    p.requires_grad_(False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            logger.warning("Out of memory fitting %d probes together; fitting %d at a time (--fit-batch).",
                           len(names[part]), size)
            continue
        done = len(names[part])
        i += done
        bar.update(done)
        last = probes[part][-1].id
        bar.set_postfix(loss=f"{report.loss_before[last]:.3f}->{report.loss_after[last]:.3f}")
    return size


@torch.no_grad()
def _write_gradient_step(peft_model: PeftModel, probes: Sequence[Probe], names: Sequence[str], batch: dict,
                         cfg: MirrorConfig, report: FitReport, curvature: Curvature | None) -> None:
    """Write each probe's adapter as one step along its probe-loss gradient, preconditioned by ``curvature``.

    A probe's gradient for a linear layer is ``sum_t d_t x_t^T`` (rank at most its token count) and a K-FAC or
    EK-FAC preconditioned one is its image under the inverse factors; its best rank-``cfg.rank`` approximation
    (an SVD) becomes the LoRA weights. Each probe's step is scaled so its probe loss moves ``cfg.step_rise`` nats to
    first order (up for unlearn, down for learn): a document's loss then moves by about ``step_rise x`` its
    gradient's (preconditioned) inner product with the probe's, the influence estimate read by forward passes.
    """
    from hf_mirror.curvature import capture, embedding_layers, linear_layers, plain_name
    from hf_mirror.stacked import lora_layers

    layers = set(lora_layers(peft_model, names[0]))
    adapted = {plain_name(n): m for n, m in peft_model.named_modules() if m in layers}
    bases = {n: m.base_layer for n, m in adapted.items()}
    supported = set(linear_layers(peft_model)) | set(embedding_layers(peft_model))
    if not set(bases) <= supported:
        raise InputError("fit='gradient' adapts the linear layers of the transformer blocks, the output layer and the "
                         f"embedding tables only; got {sorted(set(bases) - supported)}.")
    device = next(peft_model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with adapters_off(peft_model), capture(peft_model, bases) as seen:
        losses = _probe_losses(peft_model, batch)
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise ScoreError(f"Probe {probes[bad].id!r}: non-finite probe loss ({losses[bad].item()}) under the base "
                             "model; check the model's dtype and weights.")
        losses.sum().backward()  # each row's gradient is its own probe's (rows do not interact)
    mask = batch["attention_mask"].bool()
    steps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> per probe (B, A) before scaling
    along = torch.zeros(len(names), dtype=torch.float64)  # first-order loss change of each unscaled step
    for n in bases:
        if isinstance(bases[n], torch.nn.Embedding):
            steps[n] = _embedding_steps(n, seen[n], mask, cfg, curvature, along, bases[n].num_embeddings)
            continue
        x, d = seen[n]["x"] * mask[..., None], seen[n]["d"]
        # probes in slices that keep each slice's dense gradient [probes, out, in] within GRADIENT_BUDGET entries
        # (one at a time for a large vocabulary's output layer)
        size = max(1, GRADIENT_BUDGET // (d.shape[-1] * x.shape[-1]))
        steps[n] = []
        for lo in range(0, len(names), size):
            part = slice(lo, lo + size)
            steps[n] += _linear_steps(n, d[part], x[part], cfg, curvature, along[part])
    if not bool((along > 0).all()):
        bad = int((along <= 0).nonzero()[0, 0])
        raise ScoreError(f"Probe {probes[bad].id!r}: its gradient vanishes on the adapted layers (first-order change "
                         f"{along[bad].item():.3g}); the model may predict it perfectly: use --fit steps.")
    scale = cfg.step_rise / along  # unlearn: the loss rises by step_rise; learn: it falls by as much
    for n, module in adapted.items():
        for i, name in enumerate(names):
            b, a = steps[n][i]
            factor = (scale[i].item() / module.scaling[name]) ** 0.5
            if name in module.lora_embedding_A:  # the table's change is (B A)^T: A [rank, entries], B [dim, rank]
                lora_b, lora_a = module.lora_embedding_B[name], module.lora_embedding_A[name]
            else:
                lora_b, lora_a = module.lora_B[name].weight, module.lora_A[name].weight
            lora_b.zero_()
            lora_a.zero_()
            lora_b[:, : b.shape[1]] = cfg.sign * factor * b
            lora_a[: a.shape[0]] = factor * a
    for i, (probe, name) in enumerate(zip(probes, names, strict=True)):
        peft_model.set_adapter(name)
        after = _probe_losses(peft_model, {k: v[i : i + 1] for k, v in batch.items()})
        report.loss_before[probe.id] = losses[i].item()
        report.loss_after[probe.id] = after[0].item()
        report.steps[probe.id] = 1
    for p in peft_model.parameters():
        p.requires_grad_(False)


# below this width a layer's SVD is exact (cheap); from it on a seeded randomized SVD finds the top singular triples:
# gpt2-small's 768-wide layers took 0.1-0.6 s each for the full SVD and 5-54 ms this way (one thread), 11 s against
# 0.6 s per probe over its 49 adapted layers
EXACT_SVD_MAX = 256
SVD_OVERSAMPLE, SVD_POWER = 10, 2  # Halko, Martinsson & Tropp (2011): oversampling and power iterations


def _best_rank(direction: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``direction`` [..., out, in] as its singular triples (u, s, vh), one
    sign per singular pair (its largest left entry positive): the same adapter weights however the probes are grouped,
    not only the same product. From :data:`EXACT_SVD_MAX` wide on, a randomized SVD (:func:`_randomized_svd`)."""
    if min(direction.shape[-2:]) >= EXACT_SVD_MAX:
        u, s, vh = _randomized_svd(direction, rank)
    else:
        u, s, vh = torch.linalg.svd(direction, full_matrices=False)
    r = min(rank, s.shape[-1])
    u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    flip = torch.sign(torch.gather(u, -2, u.abs().argmax(dim=-2, keepdim=True))).clamp(min=0) * 2 - 1
    return u * flip, s, vh * flip.transpose(-1, -2)


def _randomized_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triples of ``a`` [..., m, n], near-exactly: a range finder with a fixed Gaussian test
    matrix (seeded, the same for every matrix of a batch, so that a probe's result does not depend on its group),
    :data:`SVD_POWER` power iterations, then the exact SVD of the small projected matrix."""
    q = min(rank + SVD_OVERSAMPLE, *a.shape[-2:])
    generator = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(a.shape[-1], q, generator=generator, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q  # [..., m, q]
    for _ in range(SVD_POWER):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # [..., q, n]: small
    return basis @ u, s, vh


def _linear_steps(name: str, d: torch.Tensor, x: torch.Tensor, cfg: MirrorConfig, curvature: Curvature | None,
                  along: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per probe, a linear layer's (B [out, r], A [r, in]) before scaling: the best rank-``cfg.rank`` approximation
    of its (preconditioned) gradient ``sum_t d_t x_t^T``; adds each step's first-order loss change to ``along`` (a
    view of the group's)."""
    grads = torch.einsum("bto,bti->boi", d.float(), x.float())
    direction = grads if curvature is None else curvature.precondition(name, grads, cfg.damping)
    u, s, vh = _best_rank(direction, cfg.rank)
    along += (u @ (s[..., None] * vh) * grads).sum(dim=(1, 2)).double().cpu()
    root = s.sqrt()[..., None]
    return [(u[i] * root[i].T, root[i] * vh[i]) for i in range(len(u))]


def _embedding_steps(name: str, seen: dict, mask: torch.Tensor, cfg: MirrorConfig, curvature: Curvature | None,
                     along: torch.Tensor, entries: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per probe, an embedding table's (B [dim, r], A [r, entries]) before scaling: the best rank-``cfg.rank``
    approximation of its (preconditioned) gradient, whose rows are the probe's distinct ids; adds each step's
    first-order loss change to ``along``."""
    from hf_mirror.curvature import embedding_gradient

    out = []
    for i, (ids, d, keep) in enumerate(zip(seen["x"], seen["d"].float(), mask, strict=True)):
        rows, grads = embedding_gradient(ids[keep], d[keep])
        direction = grads if curvature is None else curvature.precondition(name, grads, cfg.damping, rows)
        u, s, vh = _best_rank(direction.float(), cfg.rank)
        r = len(s)
        along[i] += ((u @ (s[:, None] * vh)) * grads).sum().double().cpu()
        a = torch.zeros(r, entries, dtype=u.dtype, device=u.device)
        a[:, rows] = (u * s.sqrt()).T
        out.append(((s.sqrt()[:, None] * vh).T, a))
    return out


def _attach(model, peft_model: PeftModel | None, name: str, lora: LoraConfig, seed: int) -> PeftModel:
    torch.manual_seed(seed)
    try:
        if peft_model is None:
            with quiet_peft():
                return get_peft_model(model, lora, adapter_name=name)
        with quiet_peft():
            peft_model.add_adapter(name, lora)
        return peft_model
    except ValueError as e:
        if "target module" not in str(e).lower():
            raise
        raise InputError(
            f"Could not attach a LoRA adapter ({e}). Pass target modules that exist in this model "
            "with --target-modules (e.g. q_proj v_proj, or c_attn for GPT-2)."
        ) from e


def _trunk(peft_model: PeftModel, params: Sequence[torch.nn.Parameter], cfg: MirrorConfig) -> SharedTrunk | None:
    """The shared trunk under the lowest adapted block: when there is one, the blocks can be found, and every
    adapter weight in ``params`` sits in the blocks above it."""
    layers = block_indices(cfg, peft_model)
    first = min(layers) if layers else 0
    if first <= 0:
        return None
    try:
        trunk = SharedTrunk(peft_model, first)
    except ValueError:
        return None
    above = {id(p) for block in list(trunk.blocks)[first:] for p in block.parameters()}
    return trunk if all(id(p) in above for p in params) else None


def _fit_group(peft_model: PeftModel, probes: Sequence[Probe], names: Sequence[str], batch: dict, cfg: MirrorConfig,
               report: FitReport, trunk: SharedTrunk | None = None) -> None:
    """A few optimizer steps on each probe's loss (row i of ``batch``), for its own adapter only (the blocks under
    ``trunk`` run once).

    With ``cfg.target_rise``, a probe whose loss has moved that far (in the fitting direction) stops: its rows of
    the stacked weights are put back after every later optimizer step (Adam's momentum would move them even with
    a zero gradient), so its adapter is the one it would have been fitted alone; the group stops when every probe
    has stopped or after ``cfg.steps`` steps.
    """
    peft_model.eval()  # no dropout: the mirror is a deterministic function of the probe and seed
    stacked = StackedLora(peft_model, names, trainable=True) if len(names) > 1 else None
    if stacked is None:
        peft_model.set_adapter(names[0])
        params, apply = _adapter_params(peft_model, names[0]), nullcontext
    else:
        params, apply = stacked.parameters(), stacked.applied
    for p in params:
        p.requires_grad_(True)
    opt = _make_optimizer(cfg, params)  # elementwise updates: each adapter moves as if fitted alone
    reuse = _reuse_trunk(peft_model, trunk, batch)
    stopped = torch.zeros(len(names), dtype=torch.bool)
    before: torch.Tensor | None = None
    for step in range(cfg.steps + 1):
        with reuse(), apply():
            losses = _probe_losses(peft_model, batch)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise ScoreError(
                f"Probe {probes[bad].id!r}: non-finite probe loss ({losses[bad].item()}) at mirror step {step}; "
                "lower --lr or --steps, or check the model's dtype."
            )
        values = losses.detach().cpu()
        if step == 0:
            before = values
            report.loss_before.update({p.id: v for p, v in zip(probes, values.tolist(), strict=True)})
        reached = torch.zeros_like(stopped)
        if cfg.target_rise is not None:
            reached = ~stopped & (cfg.sign * (values - before) >= cfg.target_rise)
        ending = reached | ~stopped if step == cfg.steps else reached
        for i in ending.nonzero().flatten().tolist():  # each probe's loss when its mirror stops
            report.loss_after[probes[i].id] = values[i].item()
            report.steps[probes[i].id] = step
        stopped |= ending
        if bool(stopped.all()):
            break
        _step(opt, params, losses, stopped, cfg.sign)
    for p in params:
        p.requires_grad_(False)
    if stacked is not None:
        stacked.write_back()


def _reuse_trunk(peft_model: PeftModel, trunk: SharedTrunk | None, batch: dict):
    """Run the unadapted blocks under ``trunk`` once; the context that reuses their hidden states at every step."""
    if trunk is None:
        return nullcontext
    with torch.no_grad(), trunk.capture(stop=True):
        peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return trunk.reuse


def _step(opt, params: Sequence[torch.nn.Parameter], losses: torch.Tensor, stopped: torch.Tensor,
          sign: float) -> None:
    """One optimizer step on the probes still moving; the stacked rows of stopped probes are put back after it."""
    opt.zero_grad(set_to_none=True)
    moving = (~stopped).to(losses.device)
    (-sign * losses[moving].sum()).backward()  # unlearn: ascend each probe's loss; learn: descend it
    if not bool(stopped.any()):
        opt.step()
        return
    rows = stopped.nonzero().flatten().to(losses.device)  # only stacked groups get here
    kept = [p.detach()[rows].clone() for p in params]
    opt.step()
    with torch.no_grad():
        for p, k in zip(params, kept, strict=True):
            p[rows] = k


def save_mirrors(model: PeftModel, names: Sequence[str], directory: str | Path) -> None:
    """Save each adapter in the standard PEFT layout: ``directory/<name>/adapter_model.safetensors``."""
    with quiet_peft():  # save the LoRA weights only, never a copy of an adapted output layer's full weight
        # one state dict for every adapter: PEFT would read the whole model's once per adapter
        model.save_pretrained(str(directory), selected_adapters=list(names), save_embedding_layers=False,
                              state_dict=model.state_dict())


def load_mirrors(base_model, directory: str | Path, names: Sequence[str]) -> PeftModel:
    """Reload saved mirrors onto ``base_model`` (the inverse of :func:`save_mirrors`)."""
    directory = Path(directory)
    model: PeftModel | None = None
    for name in names:
        path = directory / name
        if not (path / "adapter_config.json").exists():
            raise InputError(f"No adapter for {name!r} under {directory}; was it saved by hf-mirror?")
        if model is None:
            with quiet_peft():
                model = PeftModel.from_pretrained(base_model, str(path), adapter_name=name)
        else:
            with quiet_peft():
                model.load_adapter(str(path), adapter_name=name)
    if model is None:
        raise InputError("No adapter names given to load.")
    model.eval()
    return model


def check_mirrors(directory: str | Path, names: Sequence[str], hashes: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` unless each saved adapter's config and weights are intact.

    ``hashes`` (path under ``directory`` -> sha256, as :func:`mirror_files` lists them) are checked when given;
    every weight tensor is read either way, so a truncated file fails.
    """
    from safetensors import safe_open

    from hf_mirror.integrity import check_hashes, expect, read_json

    directory = Path(directory)
    if hashes is not None:
        expect(all(f"{n}/adapter_model.safetensors" in hashes for n in names), "a checksum for every adapter")
        check_hashes(directory, hashes)
    for name in names:
        expect(isinstance(read_json(directory / name / "adapter_config.json"), dict), f"{name}/adapter_config.json")
        weights = directory / name / "adapter_model.safetensors"
        try:
            with safe_open(str(weights), "pt") as f:
                keys = list(f.keys())
                expect(len(keys) > 0, "no tensors")
                for key in keys:
                    f.get_tensor(key)
        except Exception as e:  # safetensors' own error type, or a missing file
            raise ValueError(f"{weights}: {type(e).__name__}: {e}") from e


def mirror_files(directory: str | Path, names: Sequence[str]) -> list[Path]:
    """The files :func:`save_mirrors` wrote for ``names`` (one folder per adapter)."""
    return sorted(p for n in names for p in (Path(directory) / n).glob("*") if p.is_file())


def adapter_states(model: PeftModel, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's LoRA weights on the CPU (small: for broadcasting to other processes)."""
    from peft import get_peft_model_state_dict

    whole = model.state_dict()  # read once, filtered per adapter
    return {n: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, whole, adapter_name=n,
                                                                          save_embedding_layers=False).items()}
            for n in names}


def attach_mirrors(model, names: Sequence[str], cfg: MirrorConfig, states: dict[str, dict]) -> PeftModel:
    """Recreate fitted mirrors on ``model`` from :func:`adapter_states` (on processes that did not fit them)."""
    from peft import set_peft_model_state_dict

    lora = lora_config(cfg, model)
    peft_model: PeftModel | None = None
    for name in names:
        if peft_model is None:
            with quiet_peft():
                peft_model = get_peft_model(model, lora, adapter_name=name)
        else:
            with quiet_peft():
                peft_model.add_adapter(name, lora)
        set_peft_model_state_dict(peft_model, states[name], adapter_name=name)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    peft_model.eval()
    return peft_model
