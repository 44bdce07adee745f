"""EleutherAI's bergson (an optional extra): its EK-FAC influence and TrackStar pipelines as baselines.

Both run bergson's own command objects (``bergson ekfac`` and ``bergson trackstar`` of its CLI, built in
Python: :class:`bergson.cli.commands.Ekfac` / ``Trackstar`` with their config dataclasses), on inputs written
for it to a scratch directory that :meth:`close` removes:

* the model and tokenizer, saved with ``save_pretrained`` (bergson loads its model by path). The tokenizer copy
  gets a chat template that renders the start token, then the prompt, then the completion, with nothing
  between them: bergson's prompt/completion input labels only the completion span of that rendering. Before
  anything runs, the probes are tokenized with bergson's own ``bergson.data.tokenize`` and checked against
  :func:`hf_mirror.probes.encode_probe`: the same token ids, and labels on the completion tokens only (the
  prompt is not in the loss). A probe whose joined text tokenizes differently from its two halves is refused.
* the corpus as pre-tokenized rows (``input_ids``, ``labels``): each document's windows
  (:func:`hf_mirror.corpus.windows`), the overlap context labelled -100, as every baseline scores them. A
  document's score is the sum of its windows' scores (the document's gradient is their sum).

``bergson_ekfac`` fits K-FAC factors with eigenvalue correction on the corpus (``HessianConfig(method="kfac",
ev_correction=True)``), applies the damped inverse to each probe's gradient and scores every window against it:
``grad L(probe)^T (G + damping)^-1 grad L(window)``. ``trackstar`` is TrackStar (Chang et al., 2024): randomly
projected per-module gradients, an autocorrelation Hessian of the corpus mixed with the probes' one, unit
normalized (cosine) scores. Scores are bergson's, ``higher_is_better``: positive = the document lowers the
probe's loss = supports it, as for every method here.

bergson's loss is the *sum* of the labelled token losses, for the probes as for the corpus (the mirror and the
``ekfac`` baseline use the probe's mean completion loss): a positive per-probe factor, so rankings are unaffected.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hf_mirror.baselines._common import Document
from hf_mirror.baselines.scorer import Scorer
from hf_mirror.errors import InputError, RunError
from hf_mirror.modeling import context_length
from hf_mirror.probes import IGNORE_INDEX, Probe, encode_probe, start_token_id

VERSION = "2.5.1"  # the bergson release these command objects were written against
INSTALL = (f"The bergson_ekfac and trackstar methods need bergson: pip install 'hf-mirror[bergson]' && pip install "
           f"--no-deps bergson=={VERSION} (--no-deps: bergson declares torchvision and torchaudio, which it never "
           "imports and which replace or break a CPU torch).")
PRECISIONS = ("fp32", "bf16", "fp16", "fp64", "auto")


def _bergson() -> SimpleNamespace:
    """bergson's public pieces, imported on first use. Importing bergson reconfigures the root logger
    (``logging.basicConfig(force=True)``); the caller's logging configuration is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import bergson
        import bergson.cli.commands as commands
        import bergson.config.config as config
        import bergson.data as data
    except ImportError as e:  # an optional dependency
        raise InputError(INSTALL) from e
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    names = ("DataConfig", "IndexConfig", "PreprocessConfig", "QuerySetConfig", "ScoreConfig", "HessianConfig",
             "HessianPipelineConfig", "InversionConfig", "TrackstarConfig", "TrackstarIndexConfig")
    return SimpleNamespace(version=bergson.__version__, Ekfac=commands.Ekfac, Trackstar=commands.Trackstar,
                           load_scores=data.load_scores, tokenize=data.tokenize,
                           **{name: getattr(config, name) for name in names})


def chat_template(tokenizer) -> str:
    """A chat template that joins the start token, the prompt and the completion (the messages' contents)."""
    start = tokenizer.convert_ids_to_tokens(start_token_id(tokenizer))
    return "{{ " + json.dumps(start) + " }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def probe_rows(bg: SimpleNamespace, tokenizer, probes: Sequence[Probe], max_length: int) -> dict[str, list]:
    """The probes as bergson tokenizes a prompt/completion dataset (``tokenizer`` carries :func:`chat_template`),
    checked against :func:`encode_probe`: same tokens, labels on the completion tokens only."""
    batch = {"prompt": [p.prompt for p in probes], "completion": [p.completion for p in probes]}
    args = bg.DataConfig(prompt_column="prompt", completion_column="completion")
    with contextlib.redirect_stdout(io.StringIO()):  # bergson prints the string it fails to find
        try:
            encoded = bg.tokenize(batch, args=args, tokenizer=tokenizer)
        except RuntimeError as e:
            raise InputError(f"bergson could not find a probe's completion in its rendering: {e}") from e
    for i, p in enumerate(probes):
        want = encode_probe(tokenizer, p, False, max_length)
        ids, labels = list(encoded["input_ids"][i]), list(encoded["labels"][i])
        if ids != want["input_ids"][0].tolist() or labels != want["labels"][0].tolist():
            raise InputError(
                f"Probe {p.id!r}: bergson tokenizes prompt + completion as one string, and the tokens across the "
                f"boundary differ from the prompt's and the completion's own ({ids} vs "
                f"{want['input_ids'][0].tolist()}); start the completion at a token boundary (e.g. with a space).")
    return batch


class _BergsonBaseline(Scorer):
    """Shared part: scratch inputs for bergson, one of its commands, its scores back per document.

    ``token_batch_size`` is bergson's tokens per batch (default: the model's context window, at most 2,048;
    it may not exceed the context); ``precision`` the dtype bergson loads the model in (``"fp32"``, bergson's
    default); ``seed`` seeds torch's generator for the run (bergson samples the K-FAC targets from the model)
    and the caller's generator state is put back. bergson's console output goes to ``bergson.log`` in the
    scratch directory, quoted when it fails.
    """

    needs_model = True
    needs_grad = True
    method = ""  # bergson's name for it (= the registry name)

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 token_batch_size: int | None = None, precision: str = "fp32", seed: int = 0) -> None:
        self._bg = _bergson()
        self.seed = seed
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        context = context_length(model, tokenizer, cap=10**9)
        token_batch_size = token_batch_size if token_batch_size is not None else min(2048, context)
        if not max_length <= token_batch_size <= context:
            raise InputError(f"token_batch_size must be between the window length ({max_length}) and the model's "
                             f"context window ({context}), got {token_batch_size}.")
        self.token_batch_size, self.precision = token_batch_size, precision
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hf_mirror_{self.method}_"))
        self.model_dir = self.workdir / "model"
        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own chat template
        tokenizer.chat_template = chat_template(tokenizer)
        self.probes = probe_rows(self._bg, tokenizer, probes, max_length)
        self.n_probes = len(probes)
        self.log = self.workdir / "bergson.log"
        with self._quiet():
            model.save_pretrained(self.model_dir)
            tokenizer.save_pretrained(self.model_dir)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[io.TextIOBase]:
        """Console output (bergson's prints, progress bars) appended to ``bergson.log``."""
        with open(self.log, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log

    def _data(self, docs: list[Document]) -> list[int]:
        """Write the probes and the documents' windows as datasets; returns each window's document index."""
        from datasets import Dataset

        rows: dict[str, list] = {"input_ids": [], "labels": []}
        owner = []
        for i, doc in enumerate(docs):
            for _, seq, ctx in doc.windows:  # the window scores seq[ctx:]: its context is not labelled
                rows["input_ids"].append(list(seq))
                rows["labels"].append([IGNORE_INDEX] * ctx + list(seq[ctx:]))
                owner.append(i)
        with self._quiet():
            Dataset.from_dict(rows).save_to_disk(str(self.workdir / "corpus"))
            Dataset.from_dict(self.probes).save_to_disk(str(self.workdir / "probes"))
        return owner

    def _index(self, cls=None, **kwargs):
        cls = cls or self._bg.IndexConfig
        return cls(run_path=str(self.workdir / "run"), model=str(self.model_dir), precision=self.precision,
                   data=self._bg.DataConfig(dataset=str(self.workdir / "corpus")),
                   token_batch_size=self.token_batch_size, overwrite=True, **kwargs)

    def _query(self):
        return self._bg.QuerySetConfig(dataset=str(self.workdir / "probes"), prompt_column="prompt",
                                       completion_column="completion", aggregation="none")

    def _command(self):  # pragma: no cover - each method defines it
        raise NotImplementedError

    def score(self, documents: Iterable[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        """Each document with its score for every probe (all documents are read before any is scored)."""
        docs = list(documents)
        if not docs:
            return
        owner = self._data(docs)
        try:
            with self._quiet(), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(self.seed)  # K-FAC's targets are sampled from the model (the true Fisher)
                self._command().execute()
        except Exception as e:
            tail = self.log.read_text()[-2000:]
            raise RunError(f"bergson's {self.method} pipeline failed: {e}\n--- bergson.log (end) ---\n{tail}") from e
        scores = self._bg.load_scores(self.workdir / "run" / "scores")
        windows = np.asarray(scores[:], np.float64)  # [windows, probes]
        if windows.shape != (len(owner), self.n_probes) or not scores.is_written():
            raise RunError(f"bergson wrote scores of shape {windows.shape} for {len(owner)} windows x "
                           f"{self.n_probes} probes.")
        per_doc = np.zeros((len(docs), self.n_probes), np.float64)
        np.add.at(per_doc, np.asarray(owner), windows)  # a document's gradient is its windows' sum
        yield from zip(docs, per_doc, strict=True)

    def close(self) -> None:
        """Remove the scratch directory (saved model, datasets, bergson's run)."""
        shutil.rmtree(self.workdir, ignore_errors=True)


class BergsonEKFACBaseline(_BergsonBaseline):
    """Score = bergson's EK-FAC influence (``bergson ekfac``: K-FAC factors with eigenvalue correction, fitted on
    the corpus), higher = more supporting.

    ``damping`` is bergson's damping factor of the inverse (its default 0.1); ``ev_correction=False`` gives plain
    K-FAC; ``token_batch_size``, ``precision`` and ``seed`` as for every bergson method.
    """

    name = method = "bergson_ekfac"

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 damping: float = 0.1, ev_correction: bool = True, token_batch_size: int | None = None,
                 precision: str = "fp32", seed: int = 0) -> None:
        if damping < 0:
            raise InputError(f"damping must be non-negative, got {damping}.")
        self.damping, self.ev_correction = damping, ev_correction
        super().__init__(model, tokenizer, probes=probes, max_length=max_length, overlap=overlap,
                         token_batch_size=token_batch_size, precision=precision, seed=seed)

    def _command(self):
        bg = self._bg
        return bg.Ekfac(
            index_cfg=self._index(), hessian_cfg=bg.HessianConfig(method="kfac", ev_correction=self.ev_correction),
            score_cfg=bg.ScoreConfig(), preprocess_cfg=bg.PreprocessConfig(),
            hessian_pipeline_cfg=bg.HessianPipelineConfig(
                query=self._query(), inversion_cfg=bg.InversionConfig(damping_factor=self.damping)))


class TrackStarBaseline(_BergsonBaseline):
    """Score = bergson's TrackStar (``bergson trackstar``), higher = more supporting.

    ``projection_dim`` is the side of each module's projected gradient (bergson's default 16: 16 x 16 values per
    module); ``unit_normalize`` scores by cosine as TrackStar does (True) or by the preconditioned dot product;
    ``mix_hessians`` mixes the probes' autocorrelation Hessian into the corpus's (bergson's default);
    ``target_downweight_components`` sets the mixing coefficient (bergson's default 1000);
    ``token_batch_size``, ``precision`` and ``seed`` as for every bergson method.
    """

    name = method = "trackstar"

    def __init__(self, model, tokenizer, *, probes: Sequence[Probe], max_length: int, overlap: int,
                 projection_dim: int = 16, unit_normalize: bool = True, mix_hessians: bool = True,
                 target_downweight_components: int = 1000, token_batch_size: int | None = None,
                 precision: str = "fp32", seed: int = 0) -> None:
        if projection_dim < 1:
            raise InputError(f"projection_dim must be at least 1, got {projection_dim}.")
        self.projection_dim, self.unit_normalize, self.mix_hessians = projection_dim, unit_normalize, mix_hessians
        self.target_downweight_components = target_downweight_components
        super().__init__(model, tokenizer, probes=probes, max_length=max_length, overlap=overlap,
                         token_batch_size=token_batch_size, precision=precision, seed=seed)

    def _command(self):
        bg = self._bg
        config = bg.TrackstarConfig(
            query=self._query(), preprocess_cfg=bg.PreprocessConfig(unit_normalize=self.unit_normalize),
            mix_hessians=self.mix_hessians, target_downweight_components=self.target_downweight_components,
            stats_sample_size=None)
        return bg.Trackstar(index_cfg=self._index(bg.TrackstarIndexConfig, projection_dim=self.projection_dim),
                            trackstar_cfg=config)
