"""Real kills (#26 item 5): SIGKILL a real ``hf-mirror attribute`` process at seeded random points in its fit, scan
and merge, rerun the same command to completion, and compare with an uninterrupted run.

Each phase is framed by files the run writes (``shards/`` appears before the fit, ``adapters/fit.json`` ends it,
the shard's ``checkpoint.json`` says ``done`` at the end of the scan, ``config.json`` is the merge's last file). A kill
is sent a seeded random delay after the phase's first file appears, the delay drawn within the phase's length in the
uninterrupted run; the phase's last file must still be missing after the kill (else the kill came too late: the
same draw is tried again with half the delay). So each phase is hit by construction, not by luck of timing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
SHARD = Path("shards") / "rank-00000-of-00001"
TORCHRUN_2 = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _done(out: Path, shard: Path = SHARD) -> bool:
    try:
        return bool(json.loads((out / shard / "checkpoint.json").read_text()).get("done"))
    except (OSError, ValueError):
        return False


# phase: (has it started, has it ended), read from the files the run writes
PHASES = {
    "fit": (lambda o: (o / "shards").exists(), lambda o: (o / "adapters" / "fit.json").exists()),
    "scan": (lambda o: (o / "adapters" / "fit.json").exists(), _done),
    "merge": (_done, lambda o: (o / "config.json").exists()),
}


@dataclass
class Clean:
    corpus: Path
    probes: Path
    ids: list[str]
    out: Path
    spans: dict  # phase -> its seconds in the uninterrupted run
    model: Path

    def argv(self, out: Path) -> list[str]:
        return ["-m", "hf_mirror.cli", "attribute", "--model", str(self.model), "--corpus", str(self.corpus),
                "--id-column", "id", "--probes", str(self.probes), "--output", str(out), "--no-progress",
                "--batch-size", "1", "--checkpoint-every", "5"]


def _watch(proc: subprocess.Popen, out: Path) -> dict:
    """When each phase starts and ends (seconds after the start), polled until the process exits."""
    t0, seen = time.monotonic(), {}
    while True:
        running = proc.poll() is None
        for name, (start, end) in PHASES.items():
            for edge, test in (("start", start), ("end", end)):
                if (name, edge) not in seen and test(out):
                    seen[name, edge] = time.monotonic() - t0
        if not running:
            return seen
        time.sleep(0.005)


@pytest.fixture(scope="module")
def clean(planted, tmp_path_factory) -> Clean:
    tmp = tmp_path_factory.mktemp("kills")
    corpus, ids = tmp / "corpus.jsonl", []
    with corpus.open("w") as f:
        for i, t in enumerate(planted.texts):
            ids.append(f"d{i}")
            f.write(json.dumps({"id": ids[-1], "text": t}) + "\n")
    probes = tmp / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:4]))
    run = Clean(corpus, probes, ids, tmp / "clean", {}, planted.model_dir)
    proc = subprocess.Popen([sys.executable, *run.argv(run.out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen = _watch(proc, run.out)
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    assert set(seen) == {(p, e) for p in PHASES for e in ("start", "end")}, seen
    run.spans = {p: seen[p, "end"] - seen[p, "start"] for p in PHASES}
    return run


def _check_same_answer(out: Path, clean: Clean) -> None:
    from hf_mirror import AttributionResult

    key = ["probe_id", "doc_id"]
    a = pd.read_parquet(out / "scores.parquet").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(clean.out / "scores.parquet").sort_values(key).reset_index(drop=True)
    assert not a.duplicated(key).any()  # each document scored once ...
    for _, rows in a.groupby("probe_id"):
        assert sorted(rows["doc_id"]) == sorted(clean.ids)  # ... and none missing
    assert list(a["probe_id"]) == list(b["probe_id"]) and list(a["doc_id"]) == list(b["doc_id"])
    for column in ("raw_score", "score"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, atol=1e-6)
    ta, tb = AttributionResult.load(out).topk, AttributionResult.load(clean.out).topk
    assert list(ta["doc_id"]) == list(tb["doc_id"]) and list(ta["rank"]) == list(tb["rank"])
    np.testing.assert_allclose(ta["score"], tb["score"], rtol=1e-5, atol=1e-6)


def _kill_in(argv: list[str], out: Path, phase: str, delay: float) -> float:
    """Start the run, SIGKILL it ``delay`` seconds into ``phase``; halve the delay until the kill lands in it."""
    started, ended = PHASES[phase]
    for _ in range(8):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not started(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before its {phase} began"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        assert rc in (0, -signal.SIGKILL), rc
        if rc == -signal.SIGKILL and not ended(out):
            return delay
        delay /= 2  # too late: the phase was over
    raise AssertionError(f"no kill landed in the {phase}")


def _loop(clean: Clean, tmp_path: Path, kills: int, seed: int) -> list[tuple]:
    rng, log = random.Random(seed), []
    for i in range(kills):
        phase = list(PHASES)[i % len(PHASES)]
        out = tmp_path / f"kill-{i}"
        delay = _kill_in(clean.argv(out), out, phase, rng.uniform(0, clean.spans[phase]))
        assert not (out / "config.json").exists()  # no result from a killed run
        parts = sorted((out / SHARD).glob("part-*.parquet"))
        if phase != "merge":  # the newest part may be one no checkpoint names yet: it is written again
            parts = parts[:-1]
        kept = {p.name: p.stat().st_mtime_ns for p in parts}
        rerun = subprocess.run([sys.executable, *clean.argv(out)], env=ENV, capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, (phase, delay, rerun.stderr[-3000:])
        now = {p.name: p.stat().st_mtime_ns for p in (out / SHARD).glob("part-*.parquet")}
        assert kept.items() <= now.items()  # a resume: the killed run's checkpointed parts kept, not written again
        if phase == "merge":
            assert now == kept  # nothing scanned again
        _check_same_answer(out, clean)
        log.append((phase, round(delay, 3)))
        shutil.rmtree(out)
    return log


def test_sigkill_in_fit_scan_and_merge_then_rerun(clean, tmp_path):
    log = _loop(clean, tmp_path, kills=3, seed=0)
    print(log)
    assert [p for p, _ in log] == ["fit", "scan", "merge"]


@pytest.mark.slow
def test_sigkill_many_times(clean, tmp_path):
    log = _loop(clean, tmp_path, kills=20, seed=1)
    print(log)
    assert len(log) == 20


def _workers(pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    ranks = {}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, children):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = child
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc")
def test_sigkill_one_of_two_torchrun_workers_then_rerun(clean, tmp_path):
    rng = random.Random(2)
    victim = rng.choice([0, 1])
    out = tmp_path / "two"
    with socket.socket() as sock:  # a free port: another torchrun may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [*TORCHRUN_2, "--master_port", str(port), *clean.argv(out)]
    proc = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = out / "shards" / f"rank-{victim:05d}-of-00002"
    target = rng.randrange(5, len(clean.ids) // 2 - 5)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads((shard / "checkpoint.json").read_text())["next_seq"] >= target:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, ("the run finished before a worker could be killed", proc.stderr.read()[-3000:])
    os.kill(_workers(proc.pid)[victim], signal.SIGKILL)
    err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode != 0, err[-3000:]  # torchrun reports the dead worker and stops the other
    assert not _done(out, shard.relative_to(out)) and not (out / "config.json").exists()
    rerun = subprocess.run([sys.executable, *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list((out / "shards").iterdir())) == 2
    _check_same_answer(out, clean)
