"""AttributionResult: the ranked documents, every score, and the token-level evidence of an attribution run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from hf_mirror.errors import InputError
from hf_mirror.probes import Probe

FILES = {
    "topk": "topk.parquet",
    "scores": "scores.parquet",
    "evidence": "evidence.parquet",
    "probes": "probes.jsonl",
    "skipped": "skipped.jsonl",
    "config": "config.json",
}


class AttributionResult:
    """The answer of one run, backed by its output directory.

    ``topk`` holds each probe's ranked documents (``probe_id``, ``rank`` from 1, ``doc_id``, ``score``,
    ``raw_score``, ``n_tokens``, ``text``); ``evidence`` the per-token losses of those documents. All
    probe x document scores stay on disk in ``scores.parquet`` and are read only when asked for.
    """

    def __init__(
        self,
        directory: str | Path,
        topk: pd.DataFrame,
        evidence: pd.DataFrame,
        probes: list[dict],
        skipped: list[dict],
        config: dict,
    ) -> None:
        self.directory = Path(directory)
        self.topk = topk
        self.evidence = evidence
        self.probe_records = probes
        self.skipped = skipped
        self.config = config

    # ---- access -------------------------------------------------------------------------------------
    @property
    def probes(self) -> list[Probe]:
        return [Probe(r["id"], r["prompt"], r.get("completion")) for r in self.probe_records]

    @property
    def probe_ids(self) -> list[str]:
        return [r["id"] for r in self.probe_records]

    def _check_probe(self, probe_id: str) -> str:
        probe_id = str(probe_id)
        if probe_id not in self.probe_ids:
            raise InputError(f"Unknown probe {probe_id!r}; probes in this result: {self.probe_ids}.")
        return probe_id

    @property
    def has_token_evidence(self) -> bool:
        """False for methods that give no per-token losses (the baselines)."""
        return not self.evidence.empty

    def top(self, probe_id: str, k: int | None = None) -> pd.DataFrame:
        """The probe's ranked documents: ``rank``, ``doc_id``, ``score``, ``text`` (best first)."""
        probe_id = self._check_probe(probe_id)
        rows = self.topk[self.topk["probe_id"] == probe_id].sort_values("rank")
        if k is not None:
            if k > self.config.get("scan", {}).get("top_k", k):
                kept = self.config["scan"]["top_k"]
                raise InputError(f"Only the top {kept} documents were kept; rerun with --top-k {k}.")
            rows = rows.head(k)
        return rows.drop(columns="probe_id").reset_index(drop=True)

    def token_deltas(self, probe_id: str, doc_id) -> pd.DataFrame:
        """Per-token evidence for one of the probe's top documents: token, base/mirror loss and ``delta``.

        ``delta`` is signed like the score: positive where the document's token supports the probe.
        """
        probe_id = self._check_probe(probe_id)
        ev = self.evidence
        rows = ev[(ev["probe_id"] == probe_id) & (ev["doc_id"].astype(str) == str(doc_id))]
        if not self.has_token_evidence:
            raise InputError(f"This result ({self.config.get('method', 'mirror')}) has no token-level evidence.")
        if rows.empty:
            raise InputError(
                f"No token evidence for document {doc_id!r} and probe {probe_id!r}: evidence is kept for each "
                "probe's top-k documents only (raise --top-k)."
            )
        return rows.drop(columns=["probe_id", "doc_id"]).sort_values("position").reset_index(drop=True)

    def scores(self) -> pd.DataFrame:
        """Every probe x document score as a pandas DataFrame (read from ``scores.parquet``)."""
        path = self.directory / FILES["scores"]
        if not path.exists():
            return pd.DataFrame(columns=["probe_id", "doc_id", "score", "raw_score", "n_tokens"])
        return pd.read_parquet(path)

    def scores_dataset(self):
        """Every probe x document score as a `datasets.Dataset` (memory-mapped, not loaded in RAM)."""
        from datasets import Dataset

        return Dataset.from_parquet(str(self.directory / FILES["scores"]))

    def summary(self) -> dict:
        return {
            "probes": len(self.probe_records),
            "documents": self.config.get("stats", {}).get("documents"),
            "tokens": self.config.get("stats", {}).get("tokens"),
            "skipped": len(self.skipped),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"AttributionResult({s['probes']} probes, {s['documents']} documents, {s['skipped']} skipped, "
            f"dir={str(self.directory)!r})"
        )

    # ---- display ------------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        """Jupyter display: generations, ranked documents with score bars, tokens shaded by delta."""
        from hf_mirror.html import render_html

        return render_html(self)

    def plot_scores(self, probe_id: str, **kwargs):
        """Histogram of the probe's scores with the top-k marked (a matplotlib Figure)."""
        from hf_mirror.plots import plot_scores

        return plot_scores(self, probe_id, **kwargs)

    def plot_token_deltas(self, probe_id: str, **kwargs):
        """Per-token loss deltas of the probe's top documents (a matplotlib Figure)."""
        from hf_mirror.plots import plot_token_deltas

        return plot_token_deltas(self, probe_id, **kwargs)

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the result to ``directory`` (the scores file is copied if it lives elsewhere)."""
        import shutil

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.topk.to_parquet(out / FILES["topk"], index=False)
        self.evidence.to_parquet(out / FILES["evidence"], index=False)
        _write_jsonl(out / FILES["probes"], self.probe_records)
        _write_jsonl(out / FILES["skipped"], self.skipped)
        (out / FILES["config"]).write_text(json.dumps(self.config, indent=2, default=str) + "\n")
        src = self.directory / FILES["scores"]
        if src.exists() and src.resolve() != (out / FILES["scores"]).resolve():
            shutil.copyfile(src, out / FILES["scores"])
        return out

    @classmethod
    def load(cls, directory: str | Path) -> AttributionResult:
        """Read a result written by :meth:`save` or by ``hf-mirror attribute``."""
        d = Path(directory)
        missing = [f for k, f in FILES.items() if k != "scores" and not (d / f).exists()]
        if missing:
            raise InputError(f"{d} is not a complete hf-mirror result (missing {missing}); rerun the attribution.")
        return cls(
            d,
            pd.read_parquet(d / FILES["topk"]),
            pd.read_parquet(d / FILES["evidence"]),
            _read_jsonl(d / FILES["probes"]),
            _read_jsonl(d / FILES["skipped"]),
            json.loads((d / FILES["config"]).read_text()),
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
