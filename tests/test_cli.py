"""The hf-mirror command line end to end on files on disk."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from hf_mirror import AttributionResult
from hf_mirror.cli import main
from hf_mirror.errors import InputError


def test_attribute_then_show(planted, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n" for i, t in enumerate(planted.texts)))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:8]))
    out = tmp_path / "out"
    rc = main(
        [
            "attribute",
            "--model",
            str(planted.model_dir),
            "--corpus",
            str(corpus),
            "--probes",
            str(probes),
            "--output",
            str(out),
            "--text-column",
            "body",
            "--id-column",
            "doc",
            "--top-k",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress silences transformers' bars too
    result = AttributionResult.load(out)
    assert result.config["scan"]["top_k"] == 4 and result.config["corpus"]["text_column"] == "body"
    batches = result.config["stats"]["base_passes"]  # forward passes of the base model, each over one batch
    assert f"{len(planted.texts)} documents, {batches} base-model batches" in caplog.text  # not "passes": one pass
    assert [result.top(f"fact-{i}", 1)["doc_id"][0] for i in range(8)].count("d0") <= 1
    assert result.top("fact-3", 1)["doc_id"][0] == "d3"
    capsys.readouterr()
    assert main(["show", str(out), "--probe", "fact-3", "-k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "probe fact-3" in shown and "doc d3" in shown and "[[" in shown and "\x1b[" not in shown
    assert main(["show", str(out), "--probe", "nope"]) == 2
    assert "Unknown probe 'nope'" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "no-such-run")]) == 2  # a mistyped path is named as one, not as damage
    err = capsys.readouterr().err
    assert "no-such-run is not a directory" in err and "--output directory" in err and "rerun" not in err


def test_mirror_flags_parse():
    from hf_mirror.cli import build_parser
    from hf_mirror.mirror import MirrorConfig, block_indices

    args = build_parser().parse_args(["attribute", "--model", "m", "--corpus", "c", "--probes", "p", "--output", "o",
                                      "--layers", "-2", "-1", "--target-modules", "all-linear", "--fit-batch", "4"])
    assert args.layers == [-2, -1] and args.fit_batch == 4
    cfg = MirrorConfig(layers=args.layers, target_modules=args.target_modules)
    assert cfg.target_modules == "all-linear"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=4, n_head=2))
    assert block_indices(cfg, model) == [2, 3]
    with pytest.raises(InputError, match="model is needed"):
        block_indices(cfg)
    with pytest.raises(InputError, match="out of range for a model with 4 blocks"):
        block_indices(MirrorConfig(layers=[-5]), model)


def test_errors_are_reported_without_traceback(planted, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"content": "x"}) + "\n")
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"id": "a", "prompt": "x", "completion": " y"}) + "\n")
    rc = main(
        [
            "attribute",
            "--model",
            str(planted.model_dir),
            "--corpus",
            str(corpus),
            "--probes",
            str(probes),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "no column 'text'; columns present: ['content']" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["attribute"], ["show"]])
def test_help(command):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_mirror.cli", *command, "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: hf-mirror" in proc.stdout


def test_baseline_method_from_the_cli(planted, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"doc": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts)))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:4]))
    rc = main(["attribute", "--method", "bm25", "--model", str(planted.model_dir), "--corpus", str(corpus),
               "--id-column", "doc", "--probes", str(probes), "--output", str(tmp_path / "bm25"), "--no-progress"])
    assert rc == 0
    result = AttributionResult.load(tmp_path / "bm25")
    assert result.config["method"] == "bm25"
    assert [result.top(f"fact-{i}", 1)["doc_id"][0] for i in range(4)] == ["d0", "d1", "d2", "d3"]
    assert "probe fact-0" in capsys.readouterr().out


BARS = ("it/s", "doc/s", "%|")  # what a tqdm progress bar writes


def test_every_subcommand_with_progress_bars_takes_no_progress(planted, tmp_path, capfd):
    """index, audit, provenance and memorization show progress bars by default and none with --no-progress."""
    corpus, evals, probes = tmp_path / "corpus.jsonl", tmp_path / "eval.jsonl", tmp_path / "probes.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts)))
    evals.write_text(json.dumps({"text": planted.facts[3]}) + "\n")
    probes.write_text(json.dumps({"id": "p", "prompt": planted.facts[3][:10], "completion": planted.facts[3][10:]})
                      + "\n")
    common = ["--model", str(planted.model_dir), "--corpus", str(corpus)]
    commands = {
        "index": ["index", *common, "--ngram", "6"],
        "audit": ["audit", *common, "--eval-set", str(evals), "--eval-split", "train", "--detectors", "ngram",
                  "--ngram", "6"],
        "provenance": ["provenance", *common, "--probes", str(probes), "--ngram", "6", "--no-mirror"],
        "memorization": ["memorization", *common, "--samples", "5", "--prefix-tokens", "4", "--suffix-tokens", "4"],
    }
    for name, argv in commands.items():
        capfd.readouterr()
        assert main([*argv, "--output", str(tmp_path / f"{name}-bars")]) == 0
        shown = capfd.readouterr().err
        assert any(bar in shown for bar in BARS), (name, shown)  # bars by default
        assert main([*argv, "--output", str(tmp_path / f"{name}-quiet"), "--no-progress"]) == 0
        err = capfd.readouterr().err
        assert not any(bar in err for bar in BARS), (name, err)
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # --no-progress lasted one command only
