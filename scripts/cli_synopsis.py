"""Write the command line's reference from its parser, so that it cannot go stale.

    python scripts/cli_synopsis.py            # writes docs/cli.md and the synopsis block of README.md
    python scripts/cli_synopsis.py --check    # exits 1, naming the file, when either differs from the parser

docs/cli.md holds every command's ``--help``; README.md's block between the ``cli-synopsis`` markers lists the
commands with their one-line help. tests/test_cli_synopsis.py runs the check.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
README = ROOT / "README.md"
START, END = "<!-- cli-synopsis:start (scripts/cli_synopsis.py) -->", "<!-- cli-synopsis:end -->"
WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the output is the same on every terminal


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser], dict[str, str]]:
    os.environ["COLUMNS"] = WIDTH
    sys.path.insert(0, str(ROOT))
    from hf_mirror.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    return parser, dict(sub.choices), helps


def cli_md() -> str:
    """docs/cli.md: the reference of every command, as ``hf-mirror COMMAND --help`` prints it."""
    parser, commands, helps = _parser()
    out = ["# `hf-mirror` command line", "",
           "Generated from the parser by `python scripts/cli_synopsis.py` (tests/test_cli_synopsis.py fails when it is "
           "stale): every command's `--help`, defaults included.", ""]
    out += [f"- [`hf-mirror {name}`](#hf-mirror-{name}): {helps[name]}" for name in commands]
    for name, command in commands.items():
        out += ["", f"## hf-mirror {name}", "", "```text", command.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


def synopsis() -> str:
    """The README's block: one line per command."""
    _, commands, helps = _parser()
    width = max(len(n) for n in commands)
    lines = [f"hf-mirror {name:<{width}}  {helps[name]}" for name in commands]
    return "\n".join([START, "```text", *lines, "```", END])


def readme_with_synopsis(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    return head + synopsis() + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    check = args.parse_args(argv).check
    stale = []
    for path, want in ((CLI_MD, cli_md()), (README, readme_with_synopsis(README.read_text(encoding="utf-8")))):
        have = path.read_text(encoding="utf-8") if path.exists() else ""
        if have != want:
            stale.append(path)
            if not check:
                path.write_text(want, encoding="utf-8")
    if check and stale:
        shown = (str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in stale)
        print("stale (run python scripts/cli_synopsis.py): " + ", ".join(shown))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
