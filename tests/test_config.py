"""The config dataclasses are the one source of every default: the CLI's flags are generated from them."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json

import pandas as pd
import pytest

from hf_mirror.cli import audit_mirror, build_parser, main
from hf_mirror.config import (
    CALIBRATED_STEPS,
    CheckpointConfig,
    MirrorConfig,
    RankingConfig,
    RetrievalConfig,
    ScanConfig,
    ScoringConfig,
    SpeedConfig,
    WindowConfig,
    result_settings,
)
from hf_mirror.flags import apply_overrides, config_from_args, flat_config, flat_fields, nested_config

REQUIRED = ["attribute", "--model", "m", "--corpus", "c", "--probes", "p", "--output", "o"]


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("cls", [MirrorConfig, ScanConfig])
def test_every_attribute_default_is_the_library_default(cls):
    parser = _subparser("attribute")
    flags = {a.dest: a for a in parser._actions}
    for name, value in flat_config(cls()).items():
        assert name in flags, f"no --{name.replace('_', '-')} flag"
        assert flags[name].default == value, name
        assert flags[name].help, f"--{name} has no help text"
    assert config_from_args(cls, build_parser().parse_args(REQUIRED)) == cls()


def test_flags_reach_the_config():
    args = build_parser().parse_args([*REQUIRED, "--fit", "steps", "--steps", "3", "--layers", "-2", "-1", "--no-cache",
                                      "--candidates", "bm25:50", "--target-modules", "all-linear"])
    mirror, scan = config_from_args(MirrorConfig, args), config_from_args(ScanConfig, args)
    assert mirror == MirrorConfig(fit="steps", steps=3, layers=[-2, -1], target_modules="all-linear")
    assert scan == ScanConfig(retrieval=RetrievalConfig(candidates=50), speed=SpeedConfig(cache=False))


def test_audit_mirror_is_the_library_mirror_with_calibrated_steps():
    args = build_parser().parse_args(["audit", "--model", "m", "--corpus", "c", "--eval-set", "e", "--output", "o"])
    assert audit_mirror(args) == MirrorConfig(fit="steps", target_modules=None, steps=CALIBRATED_STEPS)


def _int_flags(cls) -> list[tuple[str, str]]:
    """(flag, out-of-range value) for every field with a lower bound."""
    return [(f"--{name.replace('_', '-')}", str(int(f.metadata["min"]) - 1)) for name, (_, _, f) in
            flat_fields(cls).items() if f.metadata.get("min") is not None and name != "candidates"] + \
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


# ------------------------------------------------------------------------ ScanConfig's groups (issue #28, item 4)
GROUPS = {"windows": WindowConfig, "scoring": ScoringConfig, "retrieval": RetrievalConfig, "ranking": RankingConfig,
          "speed": SpeedConfig, "checkpoints": CheckpointConfig}
# settings away from every default, by flat name (the names of the flags and of config.json's "scan")
CHANGED = {"top_k": 5, "normalize": "zscore", "controls": 3, "min_pool": 4, "max_new_tokens": 16,
           "candidates": "bm25:50", "aggregate": "max", "rank_by": "mirror", "mirror_weight": 0.5,
           "lexical_weight": 0.25, "read": "forward", "exact_head": 0, "retrievers": ["bm25", "dense"],
           "index": "/tmp/idx", "max_length": 64, "batch_size": 2, "cache": False}


def test_every_flat_name_belongs_to_exactly_one_group():
    assert {f.name: f.type for f in dataclasses.fields(ScanConfig)} == {k: v.__name__ for k, v in GROUPS.items()}
    owners: dict[str, list[str]] = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(group)
    assert all(len(groups) == 1 for groups in owners.values()), owners
    leaves = flat_fields(ScanConfig)
    assert list(leaves) == list(owners) and len(leaves) == 26
    assert all(path == tuple(owners[name]) and GROUPS[path[0]] is owner for name, (path, owner, _) in leaves.items())
    flags = {a.dest for a in _subparser("attribute")._actions}
    assert set(leaves) <= flags and not set(GROUPS) & flags  # flat flags, no flag per group


def test_flat_and_nested_round_trip():
    for flat in ({}, CHANGED):
        scan = nested_config(ScanConfig, flat)
        assert flat_config(scan) == {**flat_config(ScanConfig()), **flat, "candidates": 50 if flat else "auto"}
        assert nested_config(ScanConfig, flat_config(scan)) == scan
    scan = nested_config(ScanConfig, CHANGED)
    assert scan.ranking == RankingConfig(top_k=5, rank_by="mirror", mirror_weight=0.5, lexical_weight=0.25)
    assert scan.windows == WindowConfig(max_length=64, batch_size=2) and scan.speed == SpeedConfig(cache=False)
    with pytest.raises(TypeError, match="'rank'"):
        nested_config(ScanConfig, {"top_k": 3, "rank": 4})
    with pytest.raises(AttributeError, match=r"ScanConfig\.ranking\.top_k"):  # a flat read says where it moved
        ScanConfig().top_k  # noqa: B018


def test_the_groups_are_keyword_only_and_validate_their_own_fields():
    for cls in (ScanConfig, *GROUPS.values()):
        with pytest.raises(TypeError):
            cls(None)
    from hf_mirror import InputError

    with pytest.raises(InputError, match="--overlap"):
        WindowConfig(max_length=8, overlap=8)
    with pytest.raises(InputError, match="--index"):
        RetrievalConfig(retrievers=["bm25", "dense"])
    assert ScoringConfig(normalize="zscore").n_controls(3) == 5
    assert RetrievalConfig(candidates="bm25:7").n_candidates == 7


def test_overrides_reach_the_groups():
    args = argparse.Namespace(top_k=3, cache=False, max_length=None, normalize="loo")
    scan = apply_overrides(ScanConfig(), args)
    assert scan == ScanConfig(ranking=RankingConfig(top_k=3), speed=SpeedConfig(cache=False),
                              scoring=ScoringConfig(normalize="loo"))
    cli = config_from_args(ScanConfig, build_parser().parse_args(REQUIRED), top_k=5, index=None)
    assert cli == ScanConfig(ranking=RankingConfig(top_k=5))


def test_the_run_identity_of_a_scan_is_the_flat_one_it_always_was():
    """result_settings keys every run: these values were computed before ScanConfig was grouped, so outputs written
    then keep their run keys and caches. ``exact_head`` (the mixed read, 2026-12-08) changed the linear read's result
    and so its key; the forward read, which it does not reach, leaves it out (pipeline._start) and keeps its key."""
    from hf_mirror.runs import stable_key

    default, changed = ScanConfig(), nested_config(ScanConfig, CHANGED)
    assert result_settings(default) == {"top_k": 10, "normalize": "none", "controls": None, "min_pool": 8,
                                        "max_new_tokens": 32, "candidates": "auto", "aggregate": "mean",
                                        "rank_by": "hybrid", "mirror_weight": 0.0, "read": "auto", "exact_head": 10}
    assert result_settings(changed) == {"top_k": 5, "normalize": "zscore", "controls": 3, "min_pool": 4,
                                        "max_new_tokens": 16, "candidates": 50, "aggregate": "max",
                                        "rank_by": "mirror", "mirror_weight": 0.5, "lexical_weight": 0.25,
                                        "read": "forward", "exact_head": 0, "retrievers": ["bm25", "dense"]}
    assert stable_key(result_settings(default)) == "d150c5a698a8669a"
    assert stable_key(result_settings(changed)) == "0ac61036cdb8fc25"
    before = [{k: v for k, v in result_settings(scan).items() if k != "exact_head"} for scan in (default, changed)]
    assert [stable_key(settings) for settings in before] == ["f16bbad28c18610a", "249cc0c11939afcd"]


def test_config_json_records_the_scan_flat_and_a_rerun_resumes(tiny_model, planted, tmp_path):
    from hf_mirror import AttributionResult, attribute

    model, tok = tiny_model
    scan = ScanConfig(ranking=RankingConfig(top_k=2, rank_by="mirror"), windows=WindowConfig(max_length=24),
                      speed=SpeedConfig(cache=False))
    out = tmp_path / "run"
    kw = dict(output_dir=out, show_progress=False, mirror=MirrorConfig(fit="steps", steps=1))
    first = attribute(model, planted.texts[:4], planted.probes()[:2], tokenizer=copy.deepcopy(tok), scan=scan, **kw)
    recorded = json.loads((out / "config.json").read_text())["scan"]
    assert set(recorded) == set(flat_config(scan)) and not set(GROUPS) & set(recorded)
    assert recorded["top_k"] == 2 and recorded["max_length"] == 24 and recorded["rank_by"] == "mirror"
    assert AttributionResult.load(out).config["scan"] == recorded
    again = attribute(model, planted.texts[:4], planted.probes()[:2], tokenizer=copy.deepcopy(tok),
                      scan=nested_config(ScanConfig, {"top_k": 2, "rank_by": "mirror", "max_length": 24,
                                                      "cache": False}), **kw)
    pd.testing.assert_frame_equal(again.topk, first.topk)


def test_a_flat_setting_in_the_constructor_names_its_group():
    """``ScanConfig(top_k=5)`` (the flat form before the groups) is refused with the grouped form and the flat route."""
    with pytest.raises(TypeError, match=r"ranking=RankingConfig\(top_k=\.\.\.\), windows=WindowConfig\(max_length"):
        ScanConfig(top_k=5, max_length=64)
    with pytest.raises(TypeError, match=r"nested_config\(ScanConfig, \{'read': \.\.\.\}\)"):
        ScanConfig(read="forward")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        ScanConfig(bogus=1)
    assert ScanConfig(ranking=RankingConfig(top_k=5)).ranking.top_k == 5
    assert list(inspect.signature(ScanConfig).parameters) == ["windows", "scoring", "retrieval", "ranking", "speed",
                                                               "checkpoints"]
