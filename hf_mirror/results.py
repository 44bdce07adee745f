"""AttributionResult: the ranked documents, every score, and the token-level evidence of an attribution run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hf_mirror.errors import InputError, StateError
from hf_mirror.integrity import atomic_write, checked, expect, read_json
from hf_mirror.probes import Probe

FILES = {
    "topk": "topk.parquet",
    "scores": "scores.parquet",
    "evidence": "evidence.parquet",
    "probes": "probes.jsonl",
    "skipped": "skipped.jsonl",
    "config": "config.json",
}
REQUIRED = {FILES["topk"]: {"probe_id", "rank", "doc_id", "score", "text"},
            FILES["evidence"]: {"probe_id", "doc_id", "position", "token"}}
REWRITE = "rerun the attribution with the same command to write it again (or pass --overwrite to start over)"


class AttributionResult:
    """The answer of one run, backed by its output directory.

    ``topk`` holds each probe's ranked documents (``probe_id``, ``rank`` from 1, ``doc_id``, ``score``,
    ``raw_score``, ``n_tokens``, ``text``); ``evidence`` the per-token losses of those documents. All
    probe x document scores stay on disk in ``scores.parquet`` and are read only when asked for.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
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
            method = self.config.get("method", "mirror")
            raise InputError(f"This result ({method}) has no token-level evidence: method {method!r} scores whole "
                             "documents; --method mirror keeps the per-token losses of each probe's top documents.")
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
            if self.config.get("stats", {}).get("documents"):
                raise StateError(f"{path} is missing; {REWRITE}.")
            return pd.DataFrame(columns=["probe_id", "doc_id", "score", "raw_score", "n_tokens"])
        return checked(path, lambda p: pd.read_parquet(p, page_checksum_verification=True), REWRITE)

    def moved(self, probe_id: str, k: int = 5) -> pd.DataFrame:
        """The documents that moved the model most for this probe: every scanned document ranked by the mirror's
        score alone (``mirror``: after the run's normalisation; ``score`` where the run ranks by the mirror), whatever
        ``score`` ranks by. ``doc_id``, ``mirror``, ``raw_score`` (before normalisation), ``bm25`` (its BM25 score;
        NaN where a candidates-only scan did not keep it)."""
        probe_id = self._check_probe(probe_id)
        path = self.directory / FILES["scores"]
        columns = ["doc_id", "mirror", "raw_score", "bm25"]
        if not path.exists():
            return pd.DataFrame(columns=columns)
        rows = pd.read_parquet(path, filters=[("probe_id", "==", probe_id)])
        if "bm25" not in rows:
            rows["bm25"] = np.nan
        if "mirror" not in rows:  # no fusion: the score is the mirror's
            rows["mirror"] = rows["score"]
        rows = rows.assign(_neg=-rows["mirror"]).sort_values(["_neg", "doc_id"], kind="stable").head(k)
        return rows[columns].reset_index(drop=True)

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
        for key, frame in (("topk", self.topk), ("evidence", self.evidence)):  # page CRCs: corruption is detected
            atomic_write(out / FILES[key], frame.to_parquet(index=False, write_page_checksum=True))
        _write_jsonl(out / FILES["probes"], self.probe_records)
        _write_jsonl(out / FILES["skipped"], self.skipped)
        atomic_write(out / FILES["config"], (json.dumps(self.config, indent=2, default=str) + "\n").encode())
        src = self.directory / FILES["scores"]
        if src.exists() and src.resolve() != (out / FILES["scores"]).resolve():
            shutil.copyfile(src, out / FILES["scores"])
        return out

    @classmethod
    def load(cls, directory: str | Path) -> AttributionResult:
        """Read a result written by :meth:`save` or by ``hf-mirror attribute``."""
        d = Path(directory)
        if not d.is_dir():
            raise StateError(f"{d} is not a directory: pass the --output directory of `hf-mirror attribute` "
                             "(or of AttributionResult.save).")
        missing = [f for k, f in FILES.items() if k != "scores" and not (d / f).exists()]
        if missing:
            raise StateError(f"{d} is not a complete hf-mirror result (missing {missing}); {REWRITE}.")
        topk, evidence = (checked(d / FILES[k], _read_table, REWRITE) for k in ("topk", "evidence"))
        probes, skipped = (checked(d / FILES[k], _read_jsonl, REWRITE) for k in ("probes", "skipped"))
        ids = {r.get("id") for r in probes}
        if not all({"id", "prompt"} <= set(r) for r in probes) or not set(topk["probe_id"]) <= ids:
            raise StateError(f"{d / FILES['probes']} is damaged (probes missing); {REWRITE}.")
        config = checked(d / FILES["config"], _read_config, REWRITE)
        if len(skipped) != config.get("stats", {}).get("skipped", len(skipped)):
            raise StateError(f"{d / FILES['skipped']} is damaged (documents missing); {REWRITE}.")
        return cls(d, topk=topk, evidence=evidence, probes=probes, skipped=skipped, config=config)


def _read_table(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path, page_checksum_verification=True)
    expect(REQUIRED[path.name] <= set(table.columns), f"columns {sorted(table.columns)}")
    return table


def _read_config(path: Path) -> dict:
    config = read_json(path)
    expect(isinstance(config, dict), "not a JSON object")
    return config  # type: ignore[return-value]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode())


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    expect(all(isinstance(r, dict) for r in rows), "a line is not a JSON object")
    return rows
