"""docs/cli.md and the README's command list are the parser's output (#27 item 7): a flag added, removed or renamed
without running scripts/cli_synopsis.py fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("cli_synopsis", ROOT / "scripts" / "cli_synopsis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_the_parsers_help():
    script = _script()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == script.cli_md(), \
        "docs/cli.md is stale: run python scripts/cli_synopsis.py"


def test_the_readme_synopsis_is_the_parsers():
    script = _script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == script.readme_with_synopsis(readme), "README.md's command list is stale: run " \
        "python scripts/cli_synopsis.py"


def test_the_reference_names_the_flags_a_newcomer_missed():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for flag in ("--gguf-file", "--index", "--retrievers", "--lexical-weight", "--max-new-tokens", "--step-rise"):
        assert flag in text.split("## hf-mirror attribute", 1)[1].split("## hf-mirror show", 1)[0], flag


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    script = _script()
    monkeypatch.setattr(script, "CLI_MD", tmp_path / "cli.md")
    monkeypatch.setattr(script, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(f"x\n{script.START}\nold\n{script.END}\ny\n")
    assert script.main(["--check"]) == 1 and "stale" in capsys.readouterr().out
    assert script.main([]) == 0 and script.main(["--check"]) == 0
