"""Scan: the forward loop over corpus windows, giving per-token losses under the base model and each mirror."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hf_mirror.corpus import Window, document_tokens, windows
from hf_mirror.errors import InputError, ScoreError, StateError
from hf_mirror.progress import ScanProgress
from hf_mirror.stacked import StackedLora, adapters_off
from hf_mirror.trunk import SharedTrunk


@dataclass(kw_only=True)
class ScannedDoc:
    """One document's token losses: ``base[i]`` and ``mirror[p, i]`` for its i-th token and probe p."""

    doc_id: object
    text: str
    token_ids: np.ndarray
    base: np.ndarray
    mirror: np.ndarray | None  # None under the linear read, which gives ``delta`` instead
    seq: int = 0  # position in this process's stream
    delta: np.ndarray | None = None  # linear read: each probe's first-order change of the sum of the token losses


@dataclass
class Skipped:
    doc_id: object
    reason: str
    seq: int = 0


@dataclass(kw_only=True)
class _Pending:
    doc_id: object
    text: str
    token_ids: list[int]
    base: np.ndarray
    mirror: np.ndarray | None
    remaining: int
    delta: np.ndarray | None = None


def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-token cross-entropy (float32) of ``input_ids[:, 1:]`` given the prefix; shape ``[B, L-1]``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    targets = input_ids[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


def collate(seqs: Sequence[Sequence[int]], pad_id: int, device, width: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of token sequences, ``width`` wide (default: the longest)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: causal attention keeps real tokens unaffected
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class AdapterSwitch:
    """Activates one adapter of a PEFT model by visiting only its adapter layers.

    ``PeftModel.set_adapter`` walks every module of the model, and with T adapters attached there are O(T) modules
    per adapted layer: switching for each of T probes on every batch costs O(T^2) per batch. This finds the
    adapter layers once; a model with auxiliary adapter modules (``modules_to_save``) keeps PEFT's own switch.
    """

    def __init__(self, model) -> None:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.model = model
        modules = list(model.modules())
        self.layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        self.plain = any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules) or not isinstance(model, PeftModel)

    def __call__(self, name: str) -> None:
        if self.plain:
            self.model.set_adapter(name)
            return
        for layer in self.layers:
            if layer.merged:
                raise ScoreError("Mirror adapters must not be merged into the model while scanning.")
            if hasattr(layer, "_active_adapter"):  # the adapter weights are frozen already: only point the layer
                layer._active_adapter = [name]
            else:
                layer.set_adapter(name, inference_mode=True)
        self.model.active_adapter = self.model.base_model.active_adapter = name  # as PeftModel.set_adapter records


LOGITS_BUDGET = 2**22  # logits entries per pass (16 MB fp32) adapters_per_forward=0 fills (4 probes on WordNet)


class Scanner:
    """Streams documents through the base model and every mirror adapter, window batch by window batch.

    ``model`` is a PEFT model holding one adapter per name in ``adapter_names``; the base losses come from
    the same model with its adapters disabled. With ``linear`` (a :class:`hf_mirror.linear_read.LinearRead` of the same
    adapters) every mirror's first-order change of each document's loss comes from one forward and one backward pass
    per batch instead of a forward pass per mirror; documents then carry ``delta`` and no per-token mirror losses.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        adapter_names: Sequence[str],
        probe_ids: Sequence[str],
        max_length: int,
        overlap: int,
        batch_size: int = 8,
        progress: ScanProgress | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        trunk: SharedTrunk | None = None,
        adapters_per_forward: int = 1,
        fixed_width: bool = False,
        sort_batches: int = 1,
        linear=None,
    ) -> None:
        if batch_size < 1:
            raise InputError("batch_size must be at least 1.")
        if sort_batches < 1:
            raise InputError("sort_batches must be at least 1 (1 turns length sorting off).")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_names = list(adapter_names)
        self.probe_ids = list(probe_ids)
        self.max_length = max_length
        self.overlap = overlap
        self.batch_size = batch_size
        self.progress = progress or ScanProgress(show=False)
        self.autocast = autocast
        self.trunk = trunk
        self.adapters_per_forward = adapters_per_forward or self.auto_group(model, len(adapter_names), batch_size,
                                                                            max_length)
        self.width = max_length if fixed_width else None  # fixed: every batch has the same shape
        # windows pooled before batching: sorted by length, they pad less (pointless at a fixed width)
        self.pool_size = batch_size * (1 if fixed_width else sort_batches)
        self.device = next(model.parameters()).device
        self.switch = AdapterSwitch(model)
        self.linear = linear
        if linear is not None:
            if linear.names != self.adapter_names:
                raise InputError("The linear read must hold the scan's adapters, in its order.")
            self.trunk, self.adapters_per_forward = None, 1
        g = self.adapters_per_forward
        groups = [self.adapter_names[lo : lo + g] for lo in range(0, len(self.adapter_names), g)] if g > 1 else []
        stackable = bool(groups) and StackedLora.supports(model, groups[0][0])
        # (first probe index, adapter names, their stacked weights or None for PEFT's mixed-adapter batch)
        self.groups = [(i * g, grp, StackedLora(model, grp) if stackable else None) for i, grp in enumerate(groups)]
        self.skipped: list[Skipped] = []
        self.n_documents = 0
        self.n_tokens = 0
        self.next_seq = 0  # stream position after the last document read
        self.current_doc_id: object = None  # the last document read (for error reports)
        self.base_passes = 0  # forward passes of the base model (0 when every base loss came from the cache)
        self.forward_passes = 0  # all forward passes, base and mirrors
        self.window_tokens = 0  # real tokens fed to the model per pass
        self.padded_tokens = 0  # batch cells per pass (real tokens + padding)

    @staticmethod
    def auto_group(model, n_adapters: int, batch_size: int, max_length: int) -> int:
        """Adapters per forward pass when left to the scan (``adapters_per_forward=0``): as many as keep a pass's
        logits within :data:`LOGITS_BUDGET` entries at full width (1 for gpt2-small's 50k-token vocabulary at 8
        windows of 1024 tokens, 4 for the WordNet benchmark's 1000-token model at 128: there 4 ran as fast as 16 with
        48 MB less peak memory, 16 took 240 MB more than 1, and 1 took 1.4x the time)."""
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
        return max(1, min(n_adapters, LOGITS_BUDGET // max(1, batch_size * max_length * vocab)))

    def __call__(
        self,
        documents: Iterable[tuple[object, object]],
        start: int = 0,
        base_losses: Iterator[tuple[int, str, np.ndarray]] | None = None,
    ) -> Iterator[ScannedDoc]:
        """Yield each scored document, in stream order, as soon as all its windows are done.

        ``start`` is the stream position of the first document (when resuming); skipped documents are
        appended to ``self.skipped`` as they are read. ``base_losses`` (from a cache) supplies every
        document's base losses in stream order, and the base model is then not run at all.
        """
        pending: OrderedDict[int, _Pending] = OrderedDict()
        pool: list[Window] = []
        if self.linear is not None:
            base_losses = None  # the linear read runs the base model forward and backward anyway
        run_base = base_losses is None
        n_probes = len(self.adapter_names)
        self.next_seq = start
        for seq_no, (doc_id, text) in enumerate(documents, start):
            self.next_seq, self.current_doc_id = seq_no + 1, doc_id
            if text is None or (isinstance(text, str) and not text.strip()):
                reason = "missing text" if text is None else "empty or whitespace-only"
                self.skipped.append(Skipped(doc_id, reason, seq_no))
                continue
            if not isinstance(text, str):
                raise InputError(
                    f"Document {doc_id!r} has non-string text ({type(text).__name__}); "
                    "point --text-column at a string column."
                )
            seq = document_tokens(self.tokenizer, text)
            n = len(seq) - 1
            if n == 0:
                self.skipped.append(Skipped(doc_id, "no tokens after tokenization", seq_no))
                continue
            wins = windows(seq, self.max_length, self.overlap)
            base = np.empty(n, np.float32) if base_losses is None else self._cached(base_losses, seq_no, doc_id, n)
            linear = self.linear is not None
            pending[seq_no] = _Pending(doc_id=doc_id, text=text, token_ids=seq[1:], base=base,
                                       mirror=None if linear else np.empty((n_probes, n), np.float32),
                                       remaining=len(wins), delta=np.zeros(n_probes, np.float64) if linear else None)
            for w_start, ids, ctx in wins:
                pool.append(Window(seq_no, w_start, ids, ctx))
                if len(pool) == self.pool_size:
                    self._run_pool(pool, pending, run_base)
                    pool = []
                    yield from self._drain(pending)
        self._run_pool(pool, pending, run_base)
        yield from self._drain(pending)
        self.progress.close()

    def _run_pool(self, pool: list[Window], pending: OrderedDict[int, _Pending], run_base: bool) -> None:
        """Run a pool of windows in batches of ``batch_size``, sorted by length when the pool spans several.

        The linear read packs short windows: a batch takes windows while its padded area stays within
        ``batch_size`` windows of ``max_length`` tokens (the memory a full batch takes anyway), so that its one
        forward and backward pass run on fewer, larger matrices."""
        if len(pool) > self.batch_size:
            pool = sorted(pool, key=lambda w: len(w.input_ids))
        area = self.batch_size * self.max_length if self.linear is not None and self.width is None else 0
        lo = 0
        while lo < len(pool):
            hi = lo + self.batch_size  # batch_size windows; under the linear read, more while the padded area allows
            while hi < len(pool) and (hi + 1 - lo) * len(pool[hi].input_ids) <= area:
                hi += 1
            self._run(pool[lo:hi], pending, run_base)
            lo = hi

    def _drain(self, pending: OrderedDict[int, _Pending]) -> Iterator[ScannedDoc]:
        while pending and next(iter(pending.values())).remaining == 0:
            seq, d = pending.popitem(last=False)
            self.n_documents += 1
            self.n_tokens += len(d.token_ids)
            self.progress.update(1, len(d.token_ids))
            yield ScannedDoc(doc_id=d.doc_id, text=d.text, token_ids=np.asarray(d.token_ids, np.int64), base=d.base,
                             mirror=d.mirror, seq=seq, delta=d.delta)

    @staticmethod
    def _cached(base_losses: Iterator, seq_no: int, doc_id: object, n: int) -> np.ndarray:
        row = next(base_losses, None)
        if row is None or row[0] != seq_no or row[1] != str(doc_id) or len(row[2]) != n:
            raise StateError(
                f"The base-loss cache does not match the corpus at document {doc_id!r}; delete the cache "
                "directory (see --cache-dir) or pass --no-cache."
            )
        return row[2]

    @torch.no_grad()
    def _run(self, batch: list[Window], pending: OrderedDict[int, _Pending], run_base: bool = True) -> None:
        ids, mask = collate([w.input_ids for w in batch], self.tokenizer.pad_token_id, self.device, self.width)
        self.window_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        if self.linear is not None:
            self._run_linear(batch, pending, ids, mask)
            return
        record = self.trunk.capture if self.trunk is not None else nullcontext
        reuse = self.trunk.reuse if self.trunk is not None else nullcontext
        if run_base:
            with adapters_off(self.model, self.switch.layers), self.autocast(), record():
                base = token_losses(self.model, ids, mask).cpu().numpy()
            self.base_passes += 1
            self.forward_passes += 1
            self._store(batch, pending, base, None)
        elif self.trunk is not None:  # base losses are cached: run the trunk alone
            with adapters_off(self.model, self.switch.layers), self.autocast(), self.trunk.capture(stop=True):
                self.model(input_ids=ids, attention_mask=mask)
        if self.adapters_per_forward == 1:
            for p, name in enumerate(self.adapter_names):
                self.switch(name)
                with self.autocast(), reuse():
                    losses = token_losses(self.model, ids, mask).cpu().numpy()
                self.forward_passes += 1
                self._store(batch, pending, losses, p)
        else:  # groups of adapters per forward: the window batch repeated once per adapter of the group
            for lo, group, stack in self.groups:
                n = len(group)
                kwargs = {} if stack is not None else {"adapter_names": [name for name in group for _ in batch]}
                with (self.autocast(), stack.applied() if stack is not None else nullcontext(),
                      self.trunk.reuse(n) if self.trunk is not None else nullcontext()):
                    losses = token_losses(self.model, ids.repeat(n, 1), mask.repeat(n, 1), **kwargs).cpu().numpy()
                self.forward_passes += 1
                for j in range(n):
                    self._store(batch, pending, losses[j * len(batch) : (j + 1) * len(batch)], lo + j)
        for w in batch:
            pending[w.doc_seq].remaining -= 1

    def _run_linear(self, batch: list[Window], pending: OrderedDict[int, _Pending], ids: torch.Tensor,
                    mask: torch.Tensor) -> None:
        scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32, device=ids.device)
        for i, w in enumerate(batch):
            scored[i, w.n_context - 1 : len(w.input_ids) - 1] = 1.0
        with self.autocast():
            base, delta = self.linear(ids, mask, scored)
        self.base_passes += 1
        self.forward_passes += 1
        self._store(batch, pending, base.cpu().numpy(), None)
        delta = delta.cpu().numpy().astype(np.float64)
        for i, w in enumerate(batch):
            d = pending[w.doc_seq]
            if not np.isfinite(delta[i]).all():
                bad = self.probe_ids[int(np.flatnonzero(~np.isfinite(delta[i]))[0])]
                raise ScoreError(f"Non-finite first-order loss change under the mirror of probe {bad!r} on document "
                                 f"{d.doc_id!r}; check the model's dtype (use fp32).")
            d.delta += delta[i]
            d.remaining -= 1

    def _store(self, batch: list[Window], pending, losses: np.ndarray, probe: int | None) -> None:
        for i, w in enumerate(batch):
            scored = losses[i, w.n_context - 1 : len(w.input_ids) - 1]
            d = pending[w.doc_seq]
            if not np.isfinite(scored).all():
                who = "the base model" if probe is None else f"the mirror of probe {self.probe_ids[probe]!r}"
                raise ScoreError(
                    f"Non-finite token loss under {who} on document {d.doc_id!r}; "
                    "check the model's dtype (use fp32) or lower the mirror's --lr."
                )
            target = d.base if probe is None else d.mirror[probe]
            target[w.start : w.start + len(scored)] = scored
