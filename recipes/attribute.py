"""Run `hf-mirror attribute` from a YAML config, on one process or many.

    accelerate launch recipes/attribute.py --config recipes/configs/tiny_cpu.yaml [--top-k 20 ...]

Every key of the YAML file is an `hf-mirror attribute` option (underscores for dashes); options given on
the command line override it. `model: default` is the bundled demo model (trained and cached on first use),
`corpus: bundled` the bundled WordNet corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hf_mirror import demo
from hf_mirror.cli import main
from hf_mirror.distributed import process_state


def config_to_argv(config: dict) -> list[str]:
    """``{"top_k": 5, "layers": [10, 11], "include_prompt": True}`` -> ``--top-k 5 --layers 10 11 --include-prompt``."""
    argv = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def resolve(config: dict) -> dict:
    """Expand the ``default`` model and ``bundled`` corpus shortcuts (the main process trains the model first)."""
    config = dict(config)
    if config.get("model") == "default":
        state = process_state()  # the same process group as the run (a plain PartialState() would not be)
        with state.main_process_first():
            config["model"] = str(demo.train_default_model(show_progress=state.is_main_process))
    if config.get("corpus") == "bundled":
        config["corpus"] = str(demo.corpus_path())
        config.setdefault("id_column", "id")
    return config


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML file of hf-mirror attribute options")
    args, overrides = parser.parse_known_args(argv)
    config = resolve(yaml.safe_load(args.config.read_text()) or {})
    return main(["attribute", *config_to_argv(config), *overrides])


if __name__ == "__main__":
    sys.exit(run())
