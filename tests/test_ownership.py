"""Never lose or silently replace a result (issue #17): owned output directories, --overwrite that swaps a finished
run in, reuse keyed by content, inputs validated before anything is fitted or written, and a lock."""

from __future__ import annotations

import json
import logging
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest
import torch

from hf_mirror import AttributionResult, MirrorConfig, RankingConfig, ScanConfig, SpeedConfig, WindowConfig, attribute
from hf_mirror.cli import _open_or_build_index, main
from hf_mirror.corpus import Corpus
from hf_mirror.errors import InputError
from hf_mirror.ownership import AUDIT, MANIFEST, STAGING, Output

MIRROR = MirrorConfig(fit="steps", steps=1)


def _run(tiny_model, planted, out, corpus=None, probes=None, **kw) -> AttributionResult:
    model, tok = tiny_model
    kw.setdefault("scan", ScanConfig(ranking=RankingConfig(top_k=3)))
    return attribute(model, corpus if corpus is not None else planted.texts[:8],
                     probes if probes is not None else planted.probes()[:2], tokenizer=tok, output_dir=out,
                     show_progress=False, mirror=kw.pop("mirror", MIRROR), **kw)


def _listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_directory_with_other_files_is_refused_and_left_alone(tiny_model, planted, tmp_path):
    out = tmp_path / "x"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("keep")
    (out / "sub" / "b.txt").write_text("keep too")
    before = _listing(out)
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"files hf-mirror did not write \(a.txt, sub\)"):
            _run(tiny_model, planted, out, overwrite=overwrite)
    assert _listing(out) == before


def test_failed_overwrite_keeps_the_previous_result(tiny_model, planted, tmp_path, monkeypatch):
    out = tmp_path / "good"
    first = _run(tiny_model, planted, out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["done"] and {"topk.parquet", "shards", "adapters"} <= set(manifest["entries"])
    before = _listing(out)
    with pytest.raises(InputError, match="does not exist"):  # a typo: refused before anything is touched
        _run(tiny_model, planted, out, probes=str(tmp_path / "typo.jsonl"), overwrite=True)
    assert _listing(out) == before

    import hf_mirror.pipeline as pipeline

    def crash(*args, **kwargs):
        raise RuntimeError("killed during the merge")

    with monkeypatch.context() as mp, pytest.raises(RuntimeError, match="killed"):
        mp.setattr(pipeline, "_merge_and_record", crash)
        _run(tiny_model, planted, out, scan=ScanConfig(ranking=RankingConfig(top_k=2)), overwrite=True)
    assert (out / STAGING).is_dir()  # the new run was built beside the old one
    assert {k: v for k, v in _listing(out).items() if not k.startswith(STAGING)} == before
    pd.testing.assert_frame_equal(AttributionResult.load(out).topk, first.topk)

    again = _run(tiny_model, planted, out, scan=ScanConfig(ranking=RankingConfig(top_k=2)),
                 overwrite=True)  # resumes the staged run
    assert again.config["scan"]["top_k"] == 2 and again.directory == out
    assert not (out / STAGING).exists() and not (out / ".hf_mirror-old").exists()
    names = {p.name for p in out.iterdir()}
    assert names <= set(json.loads((out / MANIFEST).read_text())["entries"]) | {MANIFEST, "hf_mirror.lock"}


def test_an_edited_corpus_or_changed_weights_are_refused(tiny_model, planted, tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(planted.texts[:8])]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _run(tiny_model, planted, out, corpus=Corpus(corpus))
    _run(tiny_model, planted, out, corpus=Corpus(corpus))  # the same inputs: reused
    rows[3]["text"] = rows[3]["text"].replace(" at home", " at hoem")  # same size
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="different run.*corpus content changed"):
        _run(tiny_model, planted, out, corpus=Corpus(corpus))
    _run(tiny_model, planted, tmp_path / "other", corpus=Corpus(corpus))
    model, _ = tiny_model
    w = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        w[0, 0] += 1e-3
    try:
        with pytest.raises(InputError, match=r"different run \(finished\): model weights changed;"):
            _run(tiny_model, planted, tmp_path / "other", corpus=Corpus(corpus))
    finally:
        with torch.no_grad():
            w[0, 0] -= 1e-3


def test_another_method_or_probe_set_is_refused_unless_overwrite(tiny_model, planted, tmp_path):
    out = tmp_path / "out"
    _run(tiny_model, planted, out)
    with pytest.raises(InputError, match=r"method \(mirror -> bm25\)"):
        _run(tiny_model, planted, out, method="bm25")
    with pytest.raises(InputError, match="probes changed"):
        _run(tiny_model, planted, out, probes=planted.probes()[2:4])
    bm25 = _run(tiny_model, planted, out, method="bm25", overwrite=True)
    assert bm25.config["method"] == "bm25" and json.loads((out / MANIFEST).read_text())["run"]["method"] == "bm25"


def test_another_process_layout_is_refused(tmp_path):
    identity = {"method": "mirror", "processes": 1, "settings": {"top_k": 10}}
    with Output.open(tmp_path, identity) as output:
        (output.work / "config.json").write_text("{}")  # a result
        output.finish()
    with pytest.raises(InputError, match=r"processes \(1 -> 2\); settings \(top_k: 10 -> 3\)"):
        Output.open(tmp_path, {**identity, "processes": 2, "settings": {"top_k": 3}})
    Output.open(tmp_path, identity).release()  # the same run: resumed


def test_an_error_inside_the_output_releases_it_unfinished(tmp_path):
    """What the commands that write in ``with Output.open(...)`` (or ``with output:``) rely on: an exception inside
    releases the lock without finishing the run, which stays unfinished (another run is refused, the same resumes)."""
    identity = {"command": "audit", "processes": 1}
    with pytest.raises(RuntimeError, match="cut short"), Output.open(tmp_path, identity, kind=AUDIT) as output:
        (output.work / "report.json").write_text("{}")  # half the answer
        raise RuntimeError("cut short")
    assert json.loads((tmp_path / MANIFEST).read_text())["done"] is False
    with pytest.raises(InputError, match=r"holds a different run \(unfinished\)"):  # not "Another hf-mirror run"
        Output.open(tmp_path, {**identity, "processes": 2}, kind=AUDIT)
    with Output.open(tmp_path, identity, kind=AUDIT) as again:
        assert again.work == output.work == tmp_path
        again.finish()
    assert json.loads((tmp_path / MANIFEST).read_text())["done"] is True


def test_cli_exits_2_on_another_method(planted, tmp_path, capsys):
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:2]))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted.texts[:8]))
    out = tmp_path / "out"
    attribute(str(planted.model_dir), Corpus(corpus), str(probes), output_dir=out, show_progress=False, mirror=MIRROR)
    before = _listing(out)
    code = main(["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus), "--probes", str(probes),
                 "--output", str(out), "--method", "bm25", "--no-progress"])
    assert code == 2 and "method (mirror -> bm25)" in capsys.readouterr().err
    assert _listing(out) == before


def test_inputs_are_validated_before_anything_is_written(tiny_model, planted, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    (tmp_path / "empty.jsonl").write_text("")
    for empty in ([], Corpus(tmp_path / "empty.jsonl")):
        with pytest.raises(InputError, match="has no documents"):
            _run(tiny_model, planted, out, corpus=empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:3 is not UTF-8"):
        _run(tiny_model, planted, out, corpus=Corpus(bad))
    with pytest.raises(InputError, match=r"bad.jsonl:3 is not UTF-8"):
        _run(tiny_model, planted, out, probes=str(bad))
    with pytest.raises(InputError, match=r"--max-length 100000 is above the model's context window"):
        _run(tiny_model, planted, out, scan=ScanConfig(windows=WindowConfig(max_length=100_000)))
    assert not out.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        _run(tiny_model, planted, a_file)
    import hf_mirror.ownership as ownership

    with monkeypatch.context() as mp, pytest.raises(InputError, match="read-only"):
        mp.setattr(ownership.os, "access", lambda path, mode: False)
        _run(tiny_model, planted, out)
    ro = tmp_path / "read-only"
    ro.mkdir()
    access = ownership.os.access
    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(ownership.os, "access", lambda path, mode: not Path(path).is_relative_to(ro) and access(path, mode))
        _run(tiny_model, planted, out, mirror=MirrorConfig(fit="steps", steps=0),
             scan=ScanConfig(speed=SpeedConfig(cache_dir=str(ro / "cache"))))
    assert "--steps 0" in caplog.text and f"The cache directory {ro / 'cache'} is not writable" in caplog.text
    assert not any(ro.iterdir())


def test_a_second_run_on_the_same_directory_is_locked_out(tiny_model, planted, tmp_path):
    with Output.open(tmp_path, {"method": "mirror"}), pytest.raises(InputError, match="Another hf-mirror run"):
        _run(tiny_model, planted, tmp_path)
    _run(tiny_model, planted, tmp_path)  # released


def test_a_stale_index_is_refused(tok, texts, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = Namespace(ngram=8, no_progress=True)
    _open_or_build_index(args, Corpus(corpus), tok, tmp_path / "index")
    _open_or_build_index(args, Corpus(corpus), tok, tmp_path / "index")  # reused
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]))
    with pytest.raises(InputError, match="other corpus content"):
        _open_or_build_index(args, Corpus(corpus), tok, tmp_path / "index")


def test_an_empty_corpus_is_a_clear_error_in_every_command(planted, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "eval.jsonl").write_text('{"text": "bedube keeps a white eagle at home."}\n')
    common = ["--model", str(planted.model_dir), "--corpus", str(tmp_path / "empty.jsonl")]
    for argv in (["index", *common, "--output", str(tmp_path / "i")],
                 ["memorization", *common, "--output", str(tmp_path / "m")],
                 ["audit", *common, "--eval-set", str(tmp_path / "eval.jsonl"), "--eval-split", "train",
                  "--output", str(tmp_path / "a")]):
        assert main(argv) == 2, argv
        assert "has no documents" in capsys.readouterr().err


def test_two_processes_into_a_one_process_result_are_refused(planted, tmp_path):
    import os
    import subprocess
    import sys

    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:2]))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts[:8])))
    out = tmp_path / "out"
    args = ["-m", "hf_mirror.cli", "attribute", "--model", str(planted.model_dir), "--corpus", str(corpus),
            "--probes", str(probes), "--output", str(out), "--steps", "1", "--no-progress"]
    assert main(args[2:]) == 0
    before = _listing(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "processes (1 -> 2)" in proc.stderr, proc.stderr[-2000:]
    after = _listing(out)
    assert {k: v for k, v in after.items() if k != "hf_mirror.lock"} == \
        {k: v for k, v in before.items() if k != "hf_mirror.lock"}


def test_an_edit_keeping_size_and_mtime_is_seen_by_the_result_and_the_cache(planted, tmp_path, capsys):
    """A corpus over 2 MiB edited in the middle, its size and mtime put back: the rerun is refused as another run
    (not the old result), and --overwrite recomputes it without the old content's base losses."""
    import os

    pad = "x" * (1 << 20) + "y" * 100_000  # more than 1 MiB before and after the edited document
    rows = [{"id": f"d{i}", "text": t, "pad": pad if i in (0, 7) else ""} for i, t in enumerate(planted.texts[:8])]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:2]))
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus), "--probes", str(probes),
            "--output", str(out), "--cache-dir", str(cache), "--steps", "1", "--top-k", "3", "--no-progress"]
    assert main(argv) == 0
    before = corpus.stat()
    rows[3]["text"] = rows[3]["text"].replace(" at home", " at hoem")  # same size
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    where = corpus.read_bytes().index(b"at hoem")
    assert 1 << 20 < where < before.st_size - (1 << 20)  # neither in the first nor in the last MiB
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    capsys.readouterr()
    assert main(argv) == 2 and "corpus content changed" in capsys.readouterr().err  # not the old result
    assert main([*argv, "--overwrite"]) == 0
    result = AttributionResult.load(out)
    assert result.config["stats"]["base_cache_hits"] == 0  # the old content's base losses are not read
    assert main([*argv[:8], str(tmp_path / "other"), *argv[9:]]) == 0  # the new content's cache: reused
    assert AttributionResult.load(tmp_path / "other").config["stats"]["base_cache_hits"] == 1


# ---- one ownership rule for every command that writes a folder (#26 item 1) --------------------------------------
def _inputs(planted, tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(planted.texts[:8])))
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in planted.probes()[:2]))
    return corpus, probes


def _attribute_argv(planted, corpus: Path, probes: Path, out: Path, *extra: str) -> list[str]:
    return ["attribute", "--model", str(planted.model_dir), "--corpus", str(corpus), "--probes", str(probes),
            "--output", str(out), "--steps", "1", "--top-k", "3", "--no-progress", *extra]


def _index_argv(planted, corpus: Path, out: Path | str, *extra: str) -> list[str]:
    return ["index", "--model", str(planted.model_dir), "--corpus", str(corpus), "--ngram", "4", "--output", str(out),
            "--no-progress", *extra]


def _audit_argv(planted, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["audit", "--model", str(planted.model_dir), "--corpus", str(corpus), "--eval-set", str(corpus),
            "--eval-split", "train", "--detectors", "ngram", "--ngram", "4", "--output", str(out), "--no-progress",
            *extra]


def test_index_overwrite_keeps_a_users_file_and_an_attribution_run(planted, tmp_path, capsys):
    corpus, probes = _inputs(planted, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    run = tmp_path / "run"
    assert main(_attribute_argv(planted, corpus, probes, run)) == 0
    for out, names in ((mine, "thesis.txt"), (run, "config.json")):
        before = _listing(out)
        for extra in ((), ("--overwrite",)):
            capsys.readouterr()
            assert main(_index_argv(planted, corpus, out, *extra)) == 2
            assert names in capsys.readouterr().err
            assert _listing(out) == before
    index = tmp_path / "index"
    assert main(_index_argv(planted, corpus, index)) == 0
    assert main(_index_argv(planted, corpus, index, "--ngram", "5", "--overwrite")) == 0  # its own index: replaced
    assert json.loads((index / "manifest.json").read_text())["ngram"]["n"] == 5
    (index / "bm25" / "notes.txt").write_text("mine")  # a user's file inside the index
    capsys.readouterr()
    assert main(_index_argv(planted, corpus, index, "--ngram", "6", "--overwrite")) == 2
    assert "bm25/notes.txt" in capsys.readouterr().err and (index / "bm25" / "notes.txt").read_text() == "mine"
    assert main(_index_argv(planted, corpus, index, "--ngram", "5")) == 2  # up to date, but not only its own files
    assert "bm25/notes.txt" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no hidden sibling folders


def test_index_into_the_current_directory(planted, tmp_path, monkeypatch, capsys):
    corpus, _ = _inputs(planted, tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(_index_argv(planted, corpus, ".")) == 0
    assert main(_index_argv(planted, corpus, ".", "--ngram", "5", "--overwrite")) == 0
    assert json.loads(Path("manifest.json").read_text())["ngram"]["n"] == 5
    assert sorted(p.name for p in here.iterdir()) == ["bm25", "hf_mirror.json", "hf_mirror.lock", "manifest.json",
                                                      "ngram"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "here", "p.jsonl"]
    Path("thesis.txt").write_text("mine")
    capsys.readouterr()
    assert main(_index_argv(planted, corpus, ".", "--overwrite")) == 2 and "thesis.txt" in capsys.readouterr().err
    assert Path("thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "here", "p.jsonl"]


def test_audit_refuses_a_users_report_and_an_attribution_run(planted, tmp_path, capsys):
    corpus, probes = _inputs(planted, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": true}')
    run = tmp_path / "run"
    assert main(_attribute_argv(planted, corpus, probes, run)) == 0
    for out, name in ((mine, "report.json"), (run, "config.json")):
        before = _listing(out)
        for extra in ((), ("--overwrite",)):
            capsys.readouterr()
            assert main(_audit_argv(planted, corpus, out, *extra)) == 2
            assert name in capsys.readouterr().err
            assert _listing(out) == before
    out = tmp_path / "audit"
    assert main(_audit_argv(planted, corpus, out)) == 0
    report = (out / "report.json").read_bytes()
    assert main(_audit_argv(planted, corpus, out)) == 0  # the same audit again
    capsys.readouterr()
    assert main(_audit_argv(planted, corpus, out, "--threshold", "0.9")) == 2
    assert "different run" in capsys.readouterr().err and (out / "report.json").read_bytes() == report
    assert main(_audit_argv(planted, corpus, out, "--threshold", "0.9", "--overwrite")) == 0
    assert json.loads((out / "report.json").read_text())["detector"]["threshold"] == 0.9
    capsys.readouterr()
    assert main(_attribute_argv(planted, corpus, probes, out, "--overwrite")) == 2  # an audit is not attribute's
    assert "holds the output of `hf-mirror audit`" in capsys.readouterr().err


def test_provenance_and_memorization_refuse_a_users_file(planted, tmp_path, capsys):
    corpus, probes = _inputs(planted, tmp_path)
    for name, argv in (("provenance.json", ["provenance", "--probes", str(probes), "--no-mirror", "--ngram", "4"]),
                       ("memorization.json", ["memorization", "--samples", "2", "--prefix-tokens", "4",
                                              "--suffix-tokens", "4"])):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("mine")
        for extra in ((), ("--overwrite",)):
            capsys.readouterr()
            assert main([*argv, "--model", str(planted.model_dir), "--corpus", str(corpus), "--output", str(out),
                         "--no-progress", *extra]) == 2
            assert f"did not write ({name})" in capsys.readouterr().err
            assert _listing(out) == {name: b"mine"}
        (out / name).unlink()
        assert main([*argv, "--model", str(planted.model_dir), "--corpus", str(corpus), "--output", str(out),
                     "--no-progress"]) == 0
        assert (out / name).is_file() and json.loads((out / MANIFEST).read_text())["done"]


def test_a_users_file_inside_shards_or_adapters_is_refused(planted, tmp_path, capsys):
    corpus, probes = _inputs(planted, tmp_path)
    out = tmp_path / "out"
    assert main(_attribute_argv(planted, corpus, probes, out)) == 0
    (shard,) = (out / "shards").iterdir()
    for mine in (shard / "mine.txt", out / "adapters" / "notes.txt"):
        mine.write_text("mine")
        before = _listing(out)
        for extra in ((), ("--overwrite",), ("--overwrite", "--top-k", "2")):
            capsys.readouterr()
            assert main(_attribute_argv(planted, corpus, probes, out, *extra)) == 2
            assert mine.relative_to(out).as_posix() in capsys.readouterr().err
            assert _listing(out) == before
        mine.unlink()
    assert main(_attribute_argv(planted, corpus, probes, out, "--overwrite", "--top-k", "2")) == 0


def _killed(action) -> None:
    """Run ``action`` in a forked child that SIGKILLs itself where ``action`` patches it to."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            action(pytest.MonkeyPatch())
        finally:
            os._exit(4)  # not killed
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL


def test_a_killed_overwrite_is_resumed_only_with_overwrite(planted, tmp_path, capsys):
    """An --overwrite run SIGKILLed after its staging folder holds shards: the same command without --overwrite
    (another --top-k than the finished result) is refused and the finished result kept; with --overwrite it
    resumes and swaps in."""
    import os
    import signal

    import hf_mirror.pipeline as pipeline

    corpus, probes = _inputs(planted, tmp_path)
    out = tmp_path / "out"
    assert main(_attribute_argv(planted, corpus, probes, out)) == 0
    before = _listing(out)
    second = _attribute_argv(planted, corpus, probes, out, "--top-k", "2")

    def child(mp):
        mp.setattr(pipeline, "_merge_and_record", lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL))
        main([*second, "--overwrite"])

    _killed(child)
    assert any((out / STAGING / "shards").rglob("*.parquet"))
    capsys.readouterr()
    assert main(second) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "pass --overwrite to finish it" in err
    assert {k: v for k, v in _listing(out).items() if not k.startswith(STAGING)} == before
    assert main([*second, "--overwrite"]) == 0
    assert AttributionResult.load(out).config["scan"]["top_k"] == 2 and not (out / STAGING).exists()


def test_a_swap_cut_short_is_completed_by_the_next_command(tiny_model, planted, tmp_path, monkeypatch):
    import hf_mirror.ownership as ownership

    out = tmp_path / "out"
    _run(tiny_model, planted, out)
    real, calls = ownership.os.replace, []

    def replace(src, dst):  # (os.replace of every module)
        if Path(src).parent.name == STAGING and Path(dst).parent.name != STAGING:  # the swap
            calls.append(dst)
            if len(calls) == 4:  # some of the new entries in place, others not, the old manifest still there
                raise OSError("the machine went down")
        real(src, dst)

    with monkeypatch.context() as mp, pytest.raises(OSError, match="went down"):
        mp.setattr(ownership.os, "replace", replace)
        _run(tiny_model, planted, out, scan=ScanConfig(ranking=RankingConfig(top_k=2)), overwrite=True)
    assert (out / STAGING / MANIFEST).is_file() and json.loads((out / STAGING / MANIFEST).read_text())["done"]
    # the swap is completed, then resumed
    again = _run(tiny_model, planted, out, scan=ScanConfig(ranking=RankingConfig(top_k=2)))
    assert again.config["scan"]["top_k"] == 2 and not (out / STAGING).exists()
    assert not (out / ".hf_mirror-old").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["done"] and set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                                           if p.is_file() and p.name not in ("hf_mirror.json",
                                                                                             "hf_mirror.lock")}
