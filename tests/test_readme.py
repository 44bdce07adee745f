"""The README stays true (#27 item 1): short, the answer first, its test command the one .ci/run runs, and a Layout
that names every module of the package and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_short_and_the_answer_first():
    assert len(README.splitlines()) < 200
    first = README.split("\n## ", 2)[1]
    assert first.startswith("What a run gives you") and "States it" in first and "Moved the model" in first
    table = [line for line in first.splitlines() if line.startswith("| `")]
    assert {re.match(r"\| `(\w+)`", line).group(1) for line in table} >= {"score", "bm25", "mirror", "raw_score",
                                                                          "influence", "delta"}
    assert all(line.count(" | ") == 4 for line in table)  # name, meaning, unit, question, list


def test_the_ci_runs_the_readmes_test_command():
    block = README.split("Run the tests:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = " ".join(block.replace("\\\n", " ").split())
    pips = re.findall(r"pip install [^&]+?(?= &&|$)", command)
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(pips) == 2 and command.endswith("python -m pytest -q")
    for pip in pips:
        assert pip.replace("pip install ", "pip install -q ", 1).strip() in ci, pip
    assert "\npython -m pytest -q\n" in ci


def test_the_layout_names_every_module():
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"([a-z_]+\.py|[a-z_]+/)", layout))
    package = ROOT / "hf_mirror"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert modules - named == set(), "not in the README's Layout"
    missing = {n for n in named if n.endswith(".py") and not (package / n).exists()
               and not (ROOT / "scripts" / n).exists()}
    assert missing == set(), "in the Layout but not in hf_mirror/"
