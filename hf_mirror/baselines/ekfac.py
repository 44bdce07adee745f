"""EK-FAC influence functions (Grosse et al., 2023) through ``kronfluence`` (an optional extra).

The influence of a training document on a probe is ``grad f(probe)^T (G + damping)^-1 grad L(document)``,
with ``G`` the Gauss-Newton (Fisher) matrix of the training loss approximated by eigenvalue-corrected
Kronecker factors (EK-FAC) fitted on the corpus being attributed. ``f`` is the probe's mean completion-token
loss (as the mirror's probe loss); ``L`` is the document's summed token loss, the document's share of a
training objective that sums token losses. Positive = training on the document lowers the probe's loss =
the document supports the probe, as for every method here.

What is tracked: every linear layer of the model except the output embedding (LM head), whose covariance
would be vocabulary-squared. GPT-2's ``Conv1D`` layers (a linear map with a transposed weight) are rewritten
as ``nn.Linear`` in a private copy of the model, which kronfluence then wraps: the caller's model is never
modified. Factors and scores go to a temporary directory that :meth:`EKFACBaseline.close` removes.

Cost: the factors need the whole corpus before any document can be scored (one pass for the covariances,
one for the eigenvalue correction, one for the scores; each a forward and a backward pass), so the corpus's
token windows are held in memory, like BM25's index.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_mirror.baselines._common import Document
from hf_mirror.baselines.scorer import Scorer
from hf_mirror.errors import InputError
from hf_mirror.probes import IGNORE_INDEX, Probe, encode_probe

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
INSTALL = ("The ekfac baseline needs kronfluence: pip install 'hf-mirror[ekfac]' && pip install --no-deps "
           "kronfluence==1.0.1 (--no-deps: kronfluence's declared torchvision dependency is unused and can replace "
           "or break your torch).")


def _kronfluence():
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as e:  # an optional dependency
        raise InputError(INSTALL) from e
    return kronfluence, Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace, in place, every transformers ``Conv1D`` (``x @ W + b``, ``W`` of shape [in, out]) with the
    equivalent ``nn.Linear`` (weight ``W.T``), so that kronfluence can track it. Returns ``model``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return model
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        n_in, n_out = module.weight.shape
        linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device=module.weight.device,
                           dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def tracked_linear_modules(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Names of the linear layers to track: those whose name ends with one of ``modules`` (e.g. ``["c_fc"]``),
    or every linear layer but the output embedding when ``modules`` is None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if modules is None or any(name == m or name.endswith("." + m) for m in modules):
            names.append(name)
    if not names:
        raise InputError(f"No linear layer matches modules={list(modules) if modules else None} for the ekfac "
                         "baseline.")
    return names


class _Rows(torch.utils.data.Dataset):
    """Token rows (``input_ids``, ``labels``) for kronfluence's data loaders."""

    def __init__(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.rows[i]


def _collate(pad_id: int):
    def collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    return collate


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits-shifted per-token losses [batch, seq-1] (0 where ignored) and the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
    return losses, labels != IGNORE_INDEX


def _make_task(task_base, tracked: list[str]):
    class LanguageModelingTask(task_base):
        """Training loss: summed token cross-entropy per window; measurement: each probe's mean completion loss."""

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            logits = logits.float().reshape(-1, logits.shape[-1])
            labels = batch["labels"][:, 1:].reshape(-1)
            if sample:  # the true Fisher: targets drawn from the model's own predictions
                with torch.no_grad():
                    drawn = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).view(-1)
                    labels = torch.where(labels == IGNORE_INDEX, labels, drawn)
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch, model):
            losses, mask = _token_losses(model, batch)
            return (losses.sum(1) / mask.sum(1).clamp(min=1)).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LanguageModelingTask()


class EKFACBaseline(Scorer):
    """Score = EK-FAC influence of each document on each probe (kronfluence), higher = more supporting.

    ``strategy`` is kronfluence's Hessian approximation (``"ekfac"`` default, ``"kfac"``, ``"diagonal"``,
    ``"identity"`` = plain gradient dot product); ``damping`` its damping factor (None: kronfluence's
    heuristic, 0.1 x the mean eigenvalue); ``modules`` restricts the tracked linear layers by name suffix
    (default: all but the LM head); ``empirical_fisher`` fits the factors with the corpus tokens as targets
    instead of targets sampled from the model (the true Fisher, the default); ``batch_size`` is the number of
    windows per batch; ``include_prompt`` adds the prompt tokens to the probe loss; ``seed`` fixes the sampled
    targets.
    """

    name = "ekfac"
    needs_model = True
    needs_grad = True

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 strategy: str = "ekfac", damping: float | None = None, modules: list[str] | None = None,
                 empirical_fisher: bool = False, batch_size: int = 16, include_prompt: bool = False,
                 seed: int = 0) -> None:
        kf = _kronfluence()
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if damping is not None and damping <= 0:
            raise InputError(f"damping must be positive, got {damping}.")
        if batch_size < 1:
            raise InputError("batch_size must be at least 1.")
        self._kf = kf
        self.strategy, self.damping, self.empirical_fisher = strategy, damping, empirical_fisher
        self.batch_size, self.seed = batch_size, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [encode_probe(tokenizer, p, include_prompt, max_length) for p in probes]
        self.queries = _Rows([(e["input_ids"][0].tolist(), e["labels"][0].tolist()) for e in encoded])
        # a private float copy: kronfluence freezes parameters and wraps modules in place
        self.model = linearize_conv1d(copy.deepcopy(model))
        self.model.eval()
        self.tracked = tracked_linear_modules(self.model, modules)
        self.device = next(self.model.parameters()).device
        self.workdir = Path(tempfile.mkdtemp(prefix="hf_mirror_ekfac_"))

    def _analyzer(self):
        _, Analyzer, prepare_model, _, _, Task, DataLoaderKwargs = self._kf
        task = _make_task(Task, self.tracked)
        model = prepare_model(self.model, task)
        analyzer = Analyzer("hf_mirror", model, task, cpu=self.device.type == "cpu", log_level=logging.WARNING,
                            disable_tqdm=True, output_dir=str(self.workdir))
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate(self.pad_id)))
        return analyzer

    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """Each document with its influence on every probe (all documents are read before any is scored)."""
        docs = list(documents)
        if not docs:
            return
        rows, owner = [], []
        for i, doc in enumerate(docs):
            for _, seq, ctx in doc.windows:  # the window scores seq[ctx:]: its context is masked out
                rows.append((list(seq), [IGNORE_INDEX] * ctx + list(seq[ctx:])))
                owner.append(i)
        # kronfluence calls gc.collect() around every phase; freezing the objects that exist now (the caller's
        # whole process) keeps each collection cheap, and unfreezing hands them back to the collector
        gc.freeze()
        try:
            window_scores = self._fit_and_score(_Rows(rows))
        finally:
            gc.unfreeze()
        per_doc = np.zeros((len(docs), window_scores.shape[0]), np.float64)
        np.add.at(per_doc, np.asarray(owner), window_scores.T)  # a document's gradient is its windows' sum
        yield from zip(docs, per_doc, strict=True)

    def _fit_and_score(self, train: _Rows) -> np.ndarray:
        """Fit the factors on ``train`` and return the [probes, windows] influence scores."""
        _, _, _, FactorArguments, ScoreArguments, _, _ = self._kf
        with torch.enable_grad(), warnings.catch_warnings():
            # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (deprecated in torch), disabled off GPU: its
            # FutureWarning is kronfluence's to fix, not the user's
            warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
            torch.manual_seed(self.seed)
            analyzer = self._analyzer()
            factor_args = FactorArguments(strategy=self.strategy, use_empirical_fisher=self.empirical_fisher)
            analyzer.fit_all_factors("factors", train, factor_args=factor_args, per_device_batch_size=self.batch_size,
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(
                "scores", "factors", self.queries, train, per_device_query_batch_size=self.batch_size,
                per_device_train_batch_size=self.batch_size,
                score_args=ScoreArguments(damping_factor=self.damping), overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("scores")
        return scores["all_modules"].double().cpu().numpy()

    def close(self) -> None:
        """Remove kronfluence's factors and scores (the private model copy goes with this object)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
