"""The config dataclasses are the one source of every default: the CLI's flags are generated from them."""

from __future__ import annotations

import dataclasses

import pytest

from hf_mirror.cli import audit_mirror, build_parser, main
from hf_mirror.config import CALIBRATED_STEPS, MirrorConfig, ScanConfig
from hf_mirror.flags import config_from_args

REQUIRED = ["attribute", "--model", "m", "--corpus", "c", "--probes", "p", "--output", "o"]


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("cls", [MirrorConfig, ScanConfig])
def test_every_attribute_default_is_the_library_default(cls):
    parser = _subparser("attribute")
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        assert f.name in flags, f"no --{f.name.replace('_', '-')} flag"
        assert flags[f.name].default == getattr(cls(), f.name), f.name
        assert flags[f.name].help, f"--{f.name} has no help text"
    assert config_from_args(cls, build_parser().parse_args(REQUIRED)) == cls()


def test_flags_reach_the_config():
    args = build_parser().parse_args([*REQUIRED, "--fit", "steps", "--steps", "3", "--layers", "-2", "-1", "--no-cache",
                                      "--candidates", "bm25:50", "--target-modules", "all-linear"])
    mirror, scan = config_from_args(MirrorConfig, args), config_from_args(ScanConfig, args)
    assert mirror == MirrorConfig(fit="steps", steps=3, layers=[-2, -1], target_modules="all-linear")
    assert scan == ScanConfig(cache=False, candidates=50)


def test_audit_mirror_is_the_library_mirror_with_calibrated_steps():
    args = build_parser().parse_args(["audit", "--model", "m", "--corpus", "c", "--eval-set", "e", "--output", "o"])
    assert audit_mirror(args) == MirrorConfig(fit="steps", target_modules=None, steps=CALIBRATED_STEPS)


def _int_flags(cls) -> list[tuple[str, str]]:
    """(flag, out-of-range value) for every field with a lower bound."""
    return [(f"--{f.name.replace('_', '-')}", str(int(f.metadata["min"]) - 1)) for f in dataclasses.fields(cls)
            if f.metadata.get("min") is not None and f.name != "candidates"] + \
           ([("--candidates", "bm25:0")] if cls is ScanConfig else [])


@pytest.mark.parametrize("flag,value", [*_int_flags(MirrorConfig), *_int_flags(ScanConfig), ("--threads", "0"),
                                        ("--steps", "many")])
def test_out_of_range_flags_exit_2_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*REQUIRED, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def _required_args(name: str) -> list[str]:
    """The smallest argument list the subcommand parses: dummy values for required options and positionals."""
    parser = _subparser(name)
    out = [name]
    for a in parser._actions:
        if a.required and a.option_strings:
            out += [a.option_strings[0], "x"]
        elif not a.option_strings and a.dest != "help":
            out.append("x")
    return out


def _typed_flags() -> list[tuple[str, str, str]]:
    """(subcommand, flag, value) for every typed flag of every subcommand and every value its type refuses."""
    cases = []
    for name in build_parser()._subparsers._group_actions[0].choices:
        for a in _subparser(name)._actions:
            if not a.option_strings or a.type is None or a.type is str:
                continue
            for value in ("-5", "abc", "nan", "0"):
                try:
                    a.type(value)
                except Exception:  # argparse reports what its type raises
                    cases.append((name, a.option_strings[-1], value))
    return cases


def test_every_bounded_flag_refuses_out_of_range_values():
    refused = {(name, flag) for name, flag, value in _typed_flags() if value == "-5"}
    for name, flag in [("attribute", "--max-new-tokens"), ("attribute", "--controls"), ("attribute", "--top-k"),
                       ("attribute", "--steps"), ("provenance", "--max-new-tokens"), ("provenance", "--ngram"),
                       ("audit", "--threshold"), ("memorization", "--samples"), ("show", "-k"), ("demo", "--threads")]:
        assert (name, flag) in refused, f"{name} {flag} accepts -5"


@pytest.mark.parametrize("name,flag,value", _typed_flags())
def test_every_subcommand_flag_walk_exits_2_naming_the_flag(name, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*_required_args(name), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "Traceback" not in err


def test_overlap_must_be_smaller_than_the_window(capsys):
    assert main([*REQUIRED, "--max-length", "16", "--overlap", "16"]) == 2
    err = capsys.readouterr().err
    assert "--overlap" in err and "--max-length" in err and "Traceback" not in err
