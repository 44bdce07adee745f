"""Every documented launch form, end to end: the recipe and the CLI, under python, accelerate launch and torchrun.

The recipe's ``model: default`` path asks for the process state before the run does; it must see the same
process group as the run (2 shards, ``num_processes: 2``, one report), not two one-process jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hf_mirror import demo

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_2 = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN_2 = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory) -> dict:
    """The fast default model in a private cache, 60 bundled documents and 2 bundled probes."""
    tmp = tmp_path_factory.mktemp("launch")
    env = {**os.environ, "HF_MIRROR_CACHE": str(tmp / "cache"), "HF_MIRROR_DEMO_FAST": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = demo.DemoModelConfig.fast()
    model = demo.train_default_model(config, tmp / "cache", show_progress=False)
    facts = demo.training_facts(demo.load_facts(), config)[:60]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f["id"], "text": f["text"]}) + "\n" for f in facts))
    probes = tmp / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f["id"], "prompt": f["text"].split(":")[0] + ":"}) + "\n"
                              for f in facts[:2]))
    return {"env": env, "model": model, "corpus": corpus, "probes": probes, "tmp": tmp}


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check(out: Path, proc: subprocess.CompletedProcess, world: int, n_docs: int) -> pd.DataFrame:
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == [f"rank-{r:05d}-of-{world:05d}" for r in range(world)]
    assert json.loads((out / "config.json").read_text())["num_processes"] == world
    assert proc.stdout.count(f"wrote {out}") == 1  # only the main process reports
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 2 * n_docs and not scores.duplicated(["probe_id", "doc_id"]).any()  # each doc once
    return pd.read_parquet(out / "topk.parquet")[["probe_id", "rank", "doc_id"]]


def test_recipe_one_and_two_processes(recipe_inputs):
    tmp, env = recipe_inputs["tmp"], recipe_inputs["env"]
    outputs = {}
    for world, launcher in ((1, []), (2, ACCELERATE_2)):
        out = tmp / f"recipe-{world}"
        config = tmp / f"recipe-{world}.yaml"
        config.write_text(yaml.safe_dump({
            "model": "default", "corpus": str(recipe_inputs["corpus"]), "id_column": "id",
            "probes": str(recipe_inputs["probes"]), "output": str(out), "top_k": 3, "steps": 2,
            "no_progress": True}))
        proc = _run([*launcher, "recipes/attribute.py", "--config", str(config)], env)
        outputs[world] = _check(out, proc, world, 60)
    pd.testing.assert_frame_equal(outputs[1], outputs[2])


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_cli_two_processes(recipe_inputs, launcher):
    tmp, env = recipe_inputs["tmp"], recipe_inputs["env"]
    out = tmp / f"cli-{launcher}"
    args = ["-m", "hf_mirror.cli", "attribute", "--model", str(recipe_inputs["model"]), "--corpus",
            str(recipe_inputs["corpus"]), "--probes", str(recipe_inputs["probes"]), "--output", str(out),
            "--top-k", "3", "--steps", "2", "--no-progress"]
    proc = _run([*(ACCELERATE_2 if launcher == "accelerate" else TORCHRUN_2), *args], env)
    _check(out, proc, 2, 60)


NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
socket.create_connection = refuse
from hf_mirror.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_cli_on_local_files_makes_no_network_call(recipe_inputs):
    """Without HF_*_OFFLINE in the environment, local inputs must not reach for the network."""
    tmp = recipe_inputs["tmp"]
    env = {k: v for k, v in recipe_inputs["env"].items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    attempts = tmp / "network.log"
    attempts.write_text("")
    out = tmp / "offline"
    _run(["-c", NO_NETWORK, str(attempts), "attribute", "--model", str(recipe_inputs["model"]), "--corpus",
          str(recipe_inputs["corpus"]), "--probes", str(recipe_inputs["probes"]), "--output", str(out),
          "--top-k", "3", "--steps", "1", "--no-progress"], env)
    assert attempts.read_text() == "", f"network calls: {attempts.read_text()}"
    assert (out / "topk.parquet").exists()
