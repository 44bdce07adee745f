"""What identifies a run, shared by every method: its identity in the output's manifest, its keys, the package
versions it records and the part of its result's record (config.json) that every method writes alike."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from hf_mirror.cache import tokenizer_fingerprint
from hf_mirror.corpus import Corpus
from hf_mirror.ownership import digest
from hf_mirror.probes import Probe

PACKAGES = ("hf-mirror", "torch", "transformers", "datasets", "accelerate", "peft", "evaluate")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def stable_key(*parts) -> str:
    """A 16-hex-digit key of ``parts`` (JSON, sorted keys; anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(method: str, model_name: object, weights: str | None, tokenizer, corpus: Corpus,
                 probes: list[Probe], processes: int, settings: dict) -> dict:
    """Everything that decides a run's answer, as recorded in its output directory's manifest."""
    return {"method": method, "model": str(model_name), "model weights": weights,
            "tokenizer": tokenizer_fingerprint(tokenizer), "corpus": corpus.describe(),
            "corpus content": corpus.fingerprint(), "probes": digest([asdict(p) for p in probes]),
            "processes": processes, "settings": json.loads(json.dumps(settings, default=str))}


def run_record(model_name: object, model_kwargs: dict | None, corpus: Corpus, own: dict, *, device: str | None,
               num_processes: int, run_key: str, torch_dtype: str | None, stats: dict) -> dict:
    """A result's record (its config.json), as every method writes it: the model, its keyword arguments and the
    corpus, then the method's ``own`` fields, then the device, the process count, the run key, the package versions,
    the weights' dtype and the run's stats (``device`` and ``torch_dtype`` None when the weights are not read)."""
    return {
        "model": str(model_name),
        "model_kwargs": {k: str(v) for k, v in (model_kwargs or {}).items()},
        "corpus": corpus.describe(),
        **own,
        "device": device,
        "num_processes": num_processes,
        "run_key": run_key,
        "versions": package_versions(),
        "torch_dtype": torch_dtype,
        "stats": stats,
    }
