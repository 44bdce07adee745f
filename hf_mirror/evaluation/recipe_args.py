"""Command-line plumbing shared by the benchmark recipes: offline defaults and one flag per config field.

    offline_defaults()                          # before torch / transformers / datasets are imported
    p = argparse.ArgumentParser()
    add_config_flags(p, FactTracingConfig)      # --n-countries N, --lr X, --comentions/--no-comentions, ...
    args = p.parse_args()
    cfg = apply_overrides(FactTracingConfig(), args)

Importing this module loads neither torch nor the Hugging Face libraries.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["OFFLINE_ENV", "add_config_flags", "apply_overrides", "offline_defaults"]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

C = TypeVar("C")


def offline_defaults() -> None:
    """Default to offline Hub and datasets access and no tokenizer parallelism; values already set win.

    Call it before importing transformers, datasets or huggingface_hub: they read these variables at import.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class _StoreTuple(argparse.Action):
    """Store ``nargs`` values as a tuple (for ``tuple[X, ...]`` fields)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, tuple(values or ()))


def _flag_kwargs(hint: Any, where: str) -> dict[str, Any]:
    """``add_argument`` keywords (type, nargs, action, choices) for a field annotated ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: cannot make a flag for a union {hint!r}; skip it and add the flag yourself")
        return _flag_kwargs(inner[0], where)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{where}: only tuple[X, ...] tuples get a flag, not {hint!r}")
        element = _flag_kwargs(args[0] if args else str, where)
        if "type" not in element or "nargs" in element:
            raise TypeError(f"{where}: cannot make a flag for a list of {args[0]!r}")
        return {**element, "nargs": "+", **({"action": _StoreTuple} if origin is tuple else {})}
    if isinstance(hint, type) and hint not in (dict, list, tuple, set, frozenset) \
            and not dataclasses.is_dataclass(hint):
        return {"type": hint}
    raise TypeError(f"{where}: cannot make a flag for {hint!r}; skip it and add the flag yourself")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _names(skip: Iterable[str]) -> set[str]:
    return {s.lstrip("-").replace("-", "_") for s in skip}


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     hidden: bool = True, skip: Iterable[str] = ()) -> None:
    """Add ``--field-name`` for every init field of dataclass ``cls`` (dest: the field name, default None).

    bool fields get ``--x``/``--no-x``; ``int``/``float``/``str``/``Path`` their type; ``Optional[X]`` the flag
    of ``X``; ``Literal[...]`` choices; ``list[X]``/``tuple[X, ...]`` one or more values. ``hidden`` leaves
    them out of ``--help``; ``skip`` names fields (``model_dir`` or ``--model-dir``) the caller gives flags
    of its own. Raises TypeError for a field type with no flag, and ValueError for a ``skip`` name that is
    not a field.
    """
    skipped = _names(skip)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := skipped - known:
        raise ValueError(f"skip names no field of {cls.__name__}: {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skipped:
            continue
        kwargs = _flag_kwargs(hints[f.name], f"{cls.__name__}.{f.name}")
        default = str(_field_default(f)).replace("%", "%%")
        help_text = argparse.SUPPRESS if hidden else f"{cls.__name__}.{f.name} (default {default})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=help_text, **kwargs)


def apply_overrides(cfg: C, args: argparse.Namespace, skip: Iterable[str] = ()) -> C:
    """Set every init field of dataclass ``cfg`` whose value in ``args`` is not None (its flag was given).

    Changes ``cfg`` in place and returns it; a frozen dataclass comes back as a changed copy, so use the
    return value. ``skip`` names fields to leave alone even if ``args`` has a value under their name.
    """
    skipped = _names(skip)
    changes = {f.name: value for f in dataclasses.fields(cfg)
               if f.init and f.name not in skipped and (value := getattr(args, f.name, None)) is not None}
    if not changes:
        return cfg
    if type(cfg).__dataclass_params__.frozen:
        return dataclasses.replace(cfg, **changes)
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg
