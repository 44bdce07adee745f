"""hf_mirror: which training documents made the model say this? Forward-pass attribution with LoRA mirrors.

The public names load on first use, so light submodules (``hf_mirror.errors``,
``hf_mirror.flags``) import without torch or the Hugging Face libraries: those read their
offline settings from the environment when they are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_mirror.config import (
        CheckpointConfig,
        MirrorConfig,
        RankingConfig,
        RetrievalConfig,
        ScanConfig,
        ScoringConfig,
        SpeedConfig,
        WindowConfig,
    )
    from hf_mirror.corpus import Corpus
    from hf_mirror.errors import InputError, ScoreError
    from hf_mirror.pipeline import attribute
    from hf_mirror.probes import Probe, load_probes
    from hf_mirror.results import AttributionResult

_EXPORTS = {
    "AttributionResult": "hf_mirror.results",
    "CheckpointConfig": "hf_mirror.config",
    "Corpus": "hf_mirror.corpus",
    "InputError": "hf_mirror.errors",
    "MirrorConfig": "hf_mirror.config",
    "Probe": "hf_mirror.probes",
    "RankingConfig": "hf_mirror.config",
    "RetrievalConfig": "hf_mirror.config",
    "ScanConfig": "hf_mirror.config",
    "ScoreError": "hf_mirror.errors",
    "ScoringConfig": "hf_mirror.config",
    "SpeedConfig": "hf_mirror.config",
    "WindowConfig": "hf_mirror.config",
    "attribute": "hf_mirror.pipeline",
    "load_probes": "hf_mirror.probes",
}

__all__ = [
    "AttributionResult",
    "CheckpointConfig",
    "Corpus",
    "InputError",
    "MirrorConfig",
    "Probe",
    "RankingConfig",
    "RetrievalConfig",
    "ScanConfig",
    "ScoreError",
    "ScoringConfig",
    "SpeedConfig",
    "WindowConfig",
    "attribute",
    "load_probes",
]
__version__ = "0.1.0"


def _text_bars_in_notebooks() -> None:
    """In a Jupyter kernel without ipywidgets, the first import of ``tqdm.auto`` (the Hugging Face libraries' bars)
    warns "IProgress not found. Please update jupyter and ipywidgets" and then draws text bars, which work; nothing in
    hf-mirror needs widgets, so the reader cannot act on it. Import it once here with that one warning silenced
    (a kernel only; outside one tqdm.auto is plain tqdm and never warns)."""
    import contextlib
    import sys
    import warnings

    if "ipykernel.zmqshell" not in sys.modules or "tqdm.autonotebook" in sys.modules:
        return
    # tqdm comes with the Hugging Face libraries; without them there are no bars to draw
    with warnings.catch_warnings(), contextlib.suppress(ImportError):
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.autonotebook  # noqa: F401


_text_bars_in_notebooks()


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``hf_mirror.pipeline``), on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
