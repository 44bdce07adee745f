"""The embedded default: a small GPT-2 trained on the bundled WordNet facts, cached, and a one-command demo.

``hf-mirror demo`` builds (or reuses) that model, lets it complete a few bundled prompts, attributes each
generation against all 3000 bundled documents and writes ``report.html``. Set ``HF_MIRROR_DEMO_FAST=1``
(or pass ``DemoModelConfig.fast()``) for a much smaller training budget, used by the tests and CI notebooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from hf_mirror.cache import default_cache_dir
from hf_mirror.config import RankingConfig, ScoringConfig, WindowConfig
from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.mirror import MirrorConfig
from hf_mirror.ownership import claim
from hf_mirror.pipeline import ScanConfig, attribute
from hf_mirror.probes import start_token_id
from hf_mirror.results import AttributionResult

FAST_ENV = "HF_MIRROR_DEMO_FAST"
CACHE_ENV = "HF_MIRROR_CACHE"
MARKER = "hf_mirror_model.json"  # written last: a model directory without it is incomplete
FAST_CORPUS_STRIDE = 5  # fast mode scans every 5th document (600), which includes all fast training documents
FORMAT_VERSION = 1  # bump when the training procedure changes in a way the config does not capture


def corpus_path() -> Path:
    """The bundled corpus: 3000 WordNet noun entries (``id``, ``headword``, ``text``, ``prompt``, ``completion``)."""
    return Path(str(files("hf_mirror") / "data" / "wordnet_facts.jsonl"))


def load_facts() -> list[dict]:
    with corpus_path().open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fast_mode() -> bool:
    """Whether ``HF_MIRROR_DEMO_FAST`` asks for the small budget (tests, CI notebooks)."""
    return os.environ.get(FAST_ENV, "").lower() in ("1", "true", "yes")


def corpus_stride_from_env() -> int:
    """1 (every bundled document), or ``FAST_CORPUS_STRIDE`` in fast mode."""
    return FAST_CORPUS_STRIDE if fast_mode() else 1


def bundled_corpus(stride: int = 1) -> Corpus:
    """The bundled corpus (every ``stride``-th document) as a :class:`~hf_mirror.Corpus` keyed by its ``id`` column."""
    if stride == 1:
        return Corpus(str(corpus_path()), id_column="id")
    return Corpus(load_facts()[::stride], id_column="id")


@dataclass(frozen=True, kw_only=True)
class DemoModelConfig:
    """What the default model is trained on and how.

    The model learns every ``stride``-th bundled document (a deterministic subset that fits the time budget
    of a cold ``hf-mirror demo`` on two CPU cores); the other documents stay in the scanned corpus as
    documents it never saw.
    """

    stride: int = 3
    vocab_size: int = 2000
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoModelConfig:
        """A seconds-scale budget for tests and CI: 100 documents, a narrow model (memorises a little)."""
        return cls(stride=30, vocab_size=600, n_layer=2, n_embd=64, epochs=40, batch_size=8, lr=5e-3)

    @classmethod
    def from_env(cls) -> DemoModelConfig:
        """``fast()`` when ``HF_MIRROR_DEMO_FAST`` is set to a true value, else the default."""
        return cls.fast() if fast_mode() else cls()

    def key(self) -> str:
        """Hash of the config, the corpus bytes and the training format: the cache key."""
        h = hashlib.sha256(json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True).encode())
        h.update(corpus_path().read_bytes())
        return h.hexdigest()[:12]

    def name(self) -> str:
        return f"wordnet-gpt2-{self.n_layer}x{self.n_embd}-{self.key()}"


def training_facts(facts: list[dict], config: DemoModelConfig) -> list[dict]:
    """The deterministic training subset: every ``stride``-th fact."""
    return facts[:: config.stride]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else the package cache (``$HF_MIRROR_CACHE``, else ``~/.cache/hf_mirror``)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def model_dir(config: DemoModelConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    config = config or DemoModelConfig.from_env()
    return cache_root(cache_dir) / "models" / config.name()


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy completions, batched by prompt length (no padding, so identical to one-by-one generation)."""
    start = start_token_id(tokenizer)
    encoded = [[start, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    eos = tokenizer.eos_token_id
    out: list[str | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    device = next(model.parameters()).device
    for length, idx in groups.items():
        for j in range(0, len(idx), 64):
            chunk = idx[j : j + 64]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )[:, length:]
            for i, row in zip(chunk, gen.tolist(), strict=True):
                row = row[: row.index(eos)] if eos in row else row
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [o or "" for o in out]


def fact_accuracy(model, tokenizer, facts: list[dict], n_words: int = 3) -> dict:
    """How many ``facts`` the model completes from their prompt: exact full match and first-``n_words`` match."""
    completions = complete(model, tokenizer, [f["prompt"] for f in facts])
    exact = sum(c.strip() == f["completion"].strip() for c, f in zip(completions, facts, strict=True))
    first = sum(
        c.split()[:n_words] == f["completion"].split()[:n_words] for c, f in zip(completions, facts, strict=True)
    )
    return {"n": len(facts), "exact": exact, f"first_{n_words}_words": first, "n_words": n_words}


def accuracy_sample(facts: list[dict], n: int = 200) -> list[dict]:
    """A fixed, evenly spaced sample of ``n`` facts."""
    step = max(1, len(facts) // n)
    return facts[::step][:n]


def train_default_model(
    config: DemoModelConfig | None = None,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    show_progress: bool = True,
) -> Path:
    """Build the default model into the cache (or reuse it) and return its directory (HF format).

    Training happens in a temporary sibling directory that is renamed into place only once the model, the
    tokenizer and the marker file are written, so an interrupted run never leaves a loadable half-model.
    """
    from hf_mirror.tiny_lm import train_tiny_lm

    config = config or DemoModelConfig.from_env()
    final = model_dir(config, cache_dir)
    if is_complete(final) and not retrain:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        facts = training_facts(load_facts(), config)
        t0 = time.perf_counter()
        model, tokenizer = train_tiny_lm(
            [f["text"] for f in facts],
            tmp,
            vocab_size=config.vocab_size,
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            n_head=config.n_head,
            n_positions=config.n_positions,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            show_progress=show_progress,
        )
        train_s = time.perf_counter() - t0
        accuracy = fact_accuracy(model, tokenizer, accuracy_sample(facts))
        info = {
            "name": final.name,
            "config": asdict(config),
            "format": FORMAT_VERSION,
            "corpus": str(corpus_path()),
            "training_documents": len(facts),
            "train_seconds": round(train_s, 1),
            "fact_accuracy": accuracy,
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale(final: Path, age_s: float = 3600.0) -> None:
    """Delete temporary directories that killed trainings of this model left behind (older than ``age_s``)."""
    now = time.time()
    for p in final.parent.glob(f".{final.name}.*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an older copy; if another process won the race, keep theirs."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_info(path: str | Path) -> dict:
    """The metadata written next to a default model (config, training time, fact accuracy)."""
    return json.loads((Path(path) / MARKER).read_text())


def load_default_model(
    config: DemoModelConfig | None = None,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    show_progress: bool = True,
):
    """``(model, tokenizer, info)`` of the default model, trained first if it is not cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = train_default_model(config, cache_dir, retrain, show_progress)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, {**model_info(path), "path": str(path)}


def demo_probes(config: DemoModelConfig, n: int = 5) -> list[dict]:
    """``n`` prompts of facts the model was trained on, evenly spaced; completions left to the model."""
    facts = training_facts(load_facts(), config)
    n = max(1, min(n, len(facts)))
    step = len(facts) / n
    picks = [facts[int(step * i + step / 2)] for i in range(n)]
    return [{"id": f["headword"], "prompt": f["prompt"], "source": f["id"]} for f in picks]


DEMO_MIRROR = MirrorConfig()  # the library's defaults: raw mean token-loss delta, no normalisation
DEMO_SCAN = ScanConfig(windows=WindowConfig(batch_size=128), scoring=ScoringConfig(max_new_tokens=48),
                       ranking=RankingConfig(top_k=5))


@dataclass(kw_only=True)
class DemoReport:
    """What ``run_demo`` did: the result, where the source documents ranked, and how long each part took."""

    result: AttributionResult
    model_path: Path
    model_info: dict
    sources: dict[str, str]
    source_ranks: dict[str, int | None]
    timings: dict[str, float] = field(default_factory=dict)
    trained: bool = False
    reused: bool = False  # the output directory already held this finished run: nothing was fitted or scanned

    @property
    def top1(self) -> int:
        return sum(r == 1 for r in self.source_ranks.values())

    def margins(self) -> dict[str, tuple[float, float | None]]:
        """Per probe whose source ranked first: its score and the best other document's (None if none)."""
        out = {}
        for pid, rank in self.source_ranks.items():
            if rank == 1:
                scores = self.result.top(pid)["score"].astype(float).tolist()
                out[pid] = (scores[0], scores[1] if len(scores) > 1 else None)
        return out

    def summary(self) -> str:
        acc = self.model_info.get("fact_accuracy", {})
        n_words = acc.get("n_words", 3)
        ranks = ", ".join(f"{p}: {r if r is not None else '>top-k'}" for p, r in self.source_ranks.items())
        margins = ", ".join(f"{p} {a:+.3f} vs {'-' if b is None else f'{b:+.3f}'}"
                            for p, (a, b) in self.margins().items())
        t = self.timings
        lines = [
            f"model: {self.model_path} ({'trained now' if self.trained else 'cached'}; trained on "
            f"{self.model_info.get('training_documents')} documents)",
            f"fact completion on {acc.get('n')} training facts: {acc.get('exact')} exact, "
            f"{acc.get(f'first_{n_words}_words')} with the first {n_words} words right",
            f"source document ranked first for {self.top1}/{len(self.source_ranks)} probes ({ranks})",
            *([f"score of the source vs the best other document: {margins}"] if margins else []),
            (f"time of the run that made this result: model {t['model']:.1f}s, attribution {t['attribute']:.1f}s, "
             f"total {t['total']:.1f}s" if {"model", "attribute", "total"} <= set(t) else
             "time of the run that made this result: not recorded") if self.reused else
            f"time: model {t.get('model', 0):.1f}s, attribution {t.get('attribute', 0):.1f}s, "
            f"total {t.get('total', 0):.1f}s",
        ]
        if self.reused:
            lines.append(f"reused the finished run in {self.result.directory} in {t.get('rerun', 0):.1f}s (nothing "
                         "refitted or rescanned); delete that folder or choose another output to run again")
        return "\n".join(lines)


def run_demo(
    output_dir: str | Path = "hf-mirror-demo",
    n_probes: int = 5,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    config: DemoModelConfig | None = None,
    mirror: MirrorConfig | None = None,
    scan: ScanConfig | None = None,
    corpus_stride: int | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> DemoReport:
    """Build or load the default model, attribute its completions of ``n_probes`` bundled prompts against
    the bundled documents, and write the result plus ``report.html`` to ``output_dir``.

    ``corpus_stride`` scans every n-th bundled document (default: all of them; every 5th in fast mode). A finished
    run of the same settings in ``output_dir`` is reused (``report.reused``) unless ``overwrite`` or the model was
    trained now.
    """
    config = config or DemoModelConfig.from_env()
    t0 = time.perf_counter()
    trained = retrain or not is_complete(model_dir(config, cache_dir))
    model, tokenizer, info = load_default_model(config, cache_dir, retrain, show_progress)
    t1 = time.perf_counter()
    stride = corpus_stride or corpus_stride_from_env()
    probes = demo_probes(config, n_probes)
    if config.stride % stride:
        raise InputError(
            f"corpus_stride {stride} must divide the model's training stride {config.stride}, "
            "so that the scanned documents include the probes' sources."
        )
    sources = {p["id"]: p["source"] for p in probes}
    overwrite = overwrite or trained  # a new model: an earlier run in output_dir is not its run
    previous = None if overwrite else _finished_run_key(Path(output_dir))
    result = attribute(
        model,
        bundled_corpus(stride),
        [{"id": p["id"], "prompt": p["prompt"]} for p in probes],
        tokenizer=tokenizer,
        mirror=mirror or DEMO_MIRROR,
        scan=scan or DEMO_SCAN,
        output_dir=output_dir,
        show_progress=show_progress,
        overwrite=overwrite,
    )
    t2 = time.perf_counter()
    ranks = _source_ranks(result, sources)
    timings = {"model": t1 - t0, "attribute": t2 - t1, "total": t2 - t0}
    reused = previous is not None and previous == result.config.get("run_key")
    if reused:  # the report keeps the timings of the run that made the result; this rerun's are told apart
        timings = {**(_finished_timings(Path(output_dir)) or {}), "rerun": t2 - t0}
    report = DemoReport(result=result, model_path=Path(info["path"]), model_info=info, sources=sources,
                        source_ranks=ranks, timings=timings, trained=trained, reused=reused)
    _write_report(report, Path(output_dir))
    return report


def _finished_timings(out: Path) -> dict | None:
    """The timings of the run that made the result in ``out`` (from its demo.json), None when unreadable."""
    try:
        timings = json.loads((out / "demo.json").read_text()).get("timings")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(timings, dict):
        return None
    return {k: v for k, v in timings.items() if k in ("model", "attribute", "total") and isinstance(v, (int, float))}


def _source_ranks(result, sources: dict[str, object]) -> dict[str, int | None]:
    """Each probe's source document's rank in its top-k (None: not there)."""
    ranks: dict[str, int | None] = {}
    for pid, src in sources.items():
        top = result.top(pid)
        hit = top.index[top["doc_id"].astype(str) == str(src)]
        ranks[pid] = int(top.loc[hit[0], "rank"]) if len(hit) else None
    return ranks


def _write_report(report: DemoReport, out: Path) -> None:
    """``report.html`` (sources tagged) and ``demo.json`` (model, source ranks, timings) beside the result."""
    from hf_mirror.report import write_report

    claim(out, ["report.html", "demo.json"])  # hf-mirror's files: --overwrite may replace them
    write_report(report.result, out, sources=report.sources,
                 title="hf-mirror demo: which bundled WordNet entries made the default model say this?",
                 preamble=_preamble_html(report))
    summary = {"model": str(report.model_path), "trained": report.trained, "reused": report.reused,
               "fact_accuracy": report.model_info.get("fact_accuracy"), "sources": report.sources,
               "source_ranks": report.source_ranks, "top1": report.top1, "timings": report.timings}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")


def _finished_run_key(out: Path) -> str | None:
    """The run key of a finished demo run in ``out`` (None when there is none, or it cannot be read)."""
    try:
        if (out / "demo.json").is_file():
            return json.loads((out / "config.json").read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _preamble_html(report: DemoReport) -> str:
    import html

    lines = "".join(f"<div>{html.escape(line)}</div>" for line in report.summary().splitlines())
    return (
        '<div style="font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:13px;color:#3d444d;'
        f'max-width:1100px;margin-bottom:12px">{lines}</div>'
    )
