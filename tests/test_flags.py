"""The recipes' shared flag plumbing: one flag per config field, bool-safe, unset flags leave the config alone."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from hf_mirror.flags import OFFLINE_ENV, add_config_flags, apply_overrides, offline_defaults

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class Toy:
    n_docs: int = 10
    lr: float = 0.5
    name: str = "a"
    comentions: bool = False
    limit: Optional[int] = None  # noqa: UP045
    cap: float | None = None
    layers: list[int] = field(default_factory=lambda: [1, 2])
    tags: tuple[str, ...] = ("x",)
    mode: Literal["fast", "slow"] = "fast"
    path: Path | None = None


@dataclass(frozen=True)
class Frozen:
    epochs: int = 3
    seed: int = 0


def parse(*argv: str, cls: type = Toy, **kwargs) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_config_flags(p, cls, **kwargs)
    return p.parse_args(list(argv))


def test_bool_flag_both_ways():
    assert apply_overrides(Toy(), parse("--comentions")).comentions is True
    assert apply_overrides(Toy(comentions=True), parse("--no-comentions")).comentions is False
    assert apply_overrides(Toy(comentions=True), parse()).comentions is True
    with pytest.raises(SystemExit):  # the old type=bool flag read "--comentions False" as True
        parse("--comentions", "False")


def test_typed_optional_and_list_fields():
    args = parse("--n-docs", "7", "--lr", "1e-3", "--name", "b", "--limit", "5", "--cap", "2.5", "--layers", "3",
                 "4", "--tags", "p", "q", "--mode", "slow", "--path", "runs/x")
    cfg = apply_overrides(Toy(), args)
    assert (cfg.n_docs, cfg.lr, cfg.name, cfg.limit, cfg.cap) == (7, 1e-3, "b", 5, 2.5)
    assert cfg.layers == [3, 4] and cfg.tags == ("p", "q") and cfg.mode == "slow" and cfg.path == Path("runs/x")
    for bad in (["--n-docs", "x"], ["--limit", "1.5"], ["--mode", "medium"], ["--layers"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_unset_flags_do_not_override():
    start = Toy(n_docs=3, lr=0.1, layers=[9], limit=4)
    cfg = apply_overrides(start, parse("--lr", "0.2"))
    assert cfg is start and (cfg.n_docs, cfg.lr, cfg.layers, cfg.limit, cfg.comentions) == (3, 0.2, [9], 4, False)


def test_skip_leaves_the_field_to_the_recipe():
    p = argparse.ArgumentParser()
    p.add_argument("--n-docs", dest="n_docs", type=int, default=None, help="the recipe's own flag")
    add_config_flags(p, Toy, skip=["n_docs", "--lr"])  # clashes without skip
    args = p.parse_args(["--n-docs", "5"])
    assert not hasattr(args, "lr")
    assert apply_overrides(Toy(), args).n_docs == 5  # same dest: applied
    assert apply_overrides(Toy(), args, skip=["n_docs"]).n_docs == 10
    with pytest.raises(argparse.ArgumentError):
        add_config_flags(p, Toy)
    with pytest.raises(ValueError, match="no field"):
        add_config_flags(argparse.ArgumentParser(), Toy, skip=["n_doc"])


def test_hidden_and_visible_help():
    hidden, shown = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_config_flags(hidden, Toy)
    add_config_flags(shown, Toy, hidden=False)
    assert "--n-docs" not in hidden.format_help()
    text = shown.format_help()
    assert "Toy.n_docs (default: 10)" in text and "--comentions, --no-comentions" in text


def test_frozen_config_comes_back_replaced():
    base = Frozen()
    cfg = apply_overrides(base, parse("--epochs", "9", cls=Frozen))
    assert cfg == Frozen(epochs=9) and base.epochs == 3


def test_unsupported_field_type_is_an_error():
    @dataclass
    class Bad:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="Bad.table"):
        add_config_flags(argparse.ArgumentParser(), Bad)


def test_offline_defaults_keep_explicit_values(monkeypatch):
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    offline_defaults()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_importing_the_helper_loads_no_hugging_face_library():
    """The recipes import it before calling offline_defaults(): huggingface_hub and datasets read it at import."""
    code = ("import sys, hf_mirror.flags\n"
            "print(sorted({'torch', 'huggingface_hub', 'datasets', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["benchmark_fact_tracing", "sweep_mirror"])
def test_fact_tracing_recipes_parse_the_bool_flag(name, monkeypatch):
    """Run the recipe's main up to the benchmark call (stubbed), with --no-comentions and an int override."""
    import importlib.util

    import benchmarks.fact_tracing as ft
    import benchmarks.sweep as sweep

    seen = {}

    def stop(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "run_benchmark", stop)
    monkeypatch.setattr(sweep, "run_sweep", stop)
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            recipe.main(["--quick", "--comentions", "--n-countries", "7"])
        assert seen["cfg"].comentions is True and seen["cfg"].n_countries == 7
        with pytest.raises(KeyboardInterrupt):
            recipe.main(["--no-comentions"])
        assert seen["cfg"].comentions is False and seen["cfg"].n_countries == ft.FactTracingConfig().n_countries
    finally:
        torch.set_num_threads(threads)
