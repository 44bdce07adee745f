"""The method contract and its one dispatcher: every attribution method by name, behind one call that returns an
AttributionResult.

    from hf_mirror import attribute
    attribute(model, corpus, probes, method="bm25")        # or "mirror" (the default), "embedding", ...

A method is a subclass of :class:`Method` (as peft's tuners register a config and a model class, and kronfluence's
``Task`` says what an influence computation needs): it declares what it needs (``needs_model``, ``needs_grad``) and
what it supports (``multi_process``, ``resumes``, ``token_evidence``), and runs through :meth:`Method.attribute`.
``mirror`` is this toolkit's method (:class:`hf_mirror.pipeline.Mirror`: it scores a shard per process by forward
passes, checkpoints and resumes, and keeps token evidence); the baselines are :class:`hf_mirror.baselines.Scorer`
subclasses, which score one shard (the whole corpus) in one process with :meth:`~hf_mirror.baselines.Scorer.score`
and start over when rerun. :func:`run` is the one dispatcher: it refuses what the method does not support, naming the
method and the alternative, before anything is loaded.

Adding a method: a :class:`Method` subclass (a scorer class in ``hf_mirror/baselines/``) and one line in
:data:`REGISTRY` (or :func:`register` from outside the package). This module imports nothing heavy, so the command line
lists the methods without loading torch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hf_mirror.errors import InputError

if TYPE_CHECKING:
    from hf_mirror.config import MirrorConfig, ScanConfig
    from hf_mirror.results import AttributionResult

# name -> "module:class" of the method, imported on first use
REGISTRY: dict[str, str] = {
    "mirror": "hf_mirror.pipeline:Mirror",
    "bm25": "hf_mirror.baselines.bm25:BM25Baseline",
    "embedding": "hf_mirror.baselines.embedding:EmbeddingBaseline",
    "gradsim": "hf_mirror.baselines.gradsim:GradSimBaseline",
    "ekfac": "hf_mirror.baselines.ekfac:EKFACBaseline",
    "bergson_ekfac": "hf_mirror.baselines.bergson:BergsonEKFACBaseline",
    "trackstar": "hf_mirror.baselines.bergson:TrackStarBaseline",
}
BASELINES = tuple(name for name in REGISTRY if name != "mirror")
MIRROR = "mirror"  # the alternative named when a baseline does not support something


@dataclass(kw_only=True)
class Request:
    """One attribution run's inputs, as :func:`hf_mirror.attribute` takes them (``options`` go to the method)."""

    model: Any
    corpus: Any
    probes: Any
    tokenizer: Any = None
    mirror: MirrorConfig | None = None
    scan: ScanConfig | None = None
    output_dir: Any = None
    model_kwargs: dict | None = None
    show_progress: bool = True
    overwrite: bool = False
    options: dict = field(default_factory=dict)


class Method(ABC):
    """An attribution method: what it needs, what it supports, how it runs.

    What it needs:

    - ``needs_model``: it reads the model's weights. False: only the tokenizer and the context length are read, so a
      model given by name is not loaded when every probe has its completion.
    - ``needs_grad``: it computes gradients while scoring (it scores under ``torch.enable_grad``).

    What it supports (each refused with an :class:`~hf_mirror.errors.InputError` naming the method and the
    alternative when it is False and asked for):

    - ``multi_process``: under ``accelerate launch`` / ``torchrun`` every process scores its shard of the corpus and
      the main process merges them. False: it runs in one process, and a launch with several is refused.
    - ``resumes``: a rerun on the same output after a crash continues from its last checkpoint. False: it scores the
      corpus again from the start (and says so).
    - ``token_evidence``: it keeps the per-token losses of each probe's top documents (``evidence.parquet``,
      :meth:`AttributionResult.token_deltas`). False: asking a result for them is refused.

    How it scores a shard is the subclass's: :class:`hf_mirror.pipeline.Mirror` scans a shard per process
    (base and mirror token losses, checkpointed); :class:`hf_mirror.baselines.Scorer` subclasses implement
    ``score(documents)``, one score per probe for each document of their one shard. :meth:`attribute` runs the whole
    method on a :class:`Request` and returns the :class:`~hf_mirror.results.AttributionResult` every method returns.
    """

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = False
    multi_process: ClassVar[bool] = False
    resumes: ClassVar[bool] = False
    token_evidence: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def attribute(cls, request: Request) -> AttributionResult:
        """Run the method on ``request``'s inputs and return its result (written to ``request.output_dir``)."""

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """What the method needs and supports, by name (what :func:`check` reads)."""
        return {k: getattr(cls, k) for k in ("needs_model", "needs_grad", "multi_process", "resumes",
                                             "token_evidence")}


def register(name: str, target: str) -> None:
    """Add a method under ``name``: ``target`` is ``"module:Class"`` of a :class:`Method` subclass (imported on first
    use). A name already taken is refused."""
    if name in REGISTRY and REGISTRY[name] != target:
        raise InputError(f"A method is already registered as {name!r} ({REGISTRY[name]}).")
    if ":" not in target:
        raise InputError(f"Register a method as 'module:Class', got {target!r}.")
    REGISTRY[name] = target


def load(name: str) -> type[Method]:
    """The :class:`Method` registered under ``name`` (imported on first use)."""
    if name not in REGISTRY:
        raise InputError(f"Unknown method {name!r}; choose one of {sorted(REGISTRY)}.")
    module, _, attr = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != name:
        raise TypeError(f"{REGISTRY[name]} is registered as method {name!r} but is not a Method subclass named so.")
    return cls


def check(cls: type[Method], processes: int | None = None) -> None:
    """Refuse what ``cls`` does not support in this launch: several processes (``processes``, default: the
    launcher's ``WORLD_SIZE``) for a method that runs in one."""
    from hf_mirror.distributed import launched_world

    processes = launched_world() if processes is None else processes
    if processes > 1 and not cls.multi_process:
        raise InputError(
            f"Method {cls.name!r} runs in one process, and this run was launched with {processes} (accelerate launch "
            f"or torchrun): run it with plain `python` / `hf-mirror attribute`, or use --method {MIRROR}, which "
            "scores one shard of the corpus per process."
        )


def run(name: str, request: Request) -> AttributionResult:
    """The dispatcher: the method registered under ``name``, checked against this launch, run on ``request``."""
    cls = load(name)
    check(cls)
    return cls.attribute(request)
