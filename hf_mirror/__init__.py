"""hf_mirror: which training documents made the model say this? Forward-pass attribution with LoRA mirrors."""

from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError, ScoreError
from hf_mirror.mirror import MirrorConfig
from hf_mirror.pipeline import ScanConfig, attribute
from hf_mirror.probes import Probe, load_probes
from hf_mirror.results import AttributionResult

__all__ = [
    "AttributionResult",
    "Corpus",
    "InputError",
    "MirrorConfig",
    "Probe",
    "ScanConfig",
    "ScoreError",
    "attribute",
    "load_probes",
]
__version__ = "0.1.0"
