"""One flag per config field: the dataclasses are the one source of every default and its help text.

    offline_defaults()                          # before torch / transformers / datasets are imported
    p = argparse.ArgumentParser()
    add_config_flags(p, FactTracingConfig)      # --n-countries N, --lr X, --comentions/--no-comentions, ...
    args = p.parse_args()
    cfg = apply_overrides(FactTracingConfig(), args)

A field's ``metadata`` may carry ``help`` (shown by ``--help`` with the default), ``min`` (values below it
are refused by the parser, naming the flag), ``flag`` (extra ``add_argument`` keywords, e.g. a ``type``
that parses ``bm25:200``) and ``cli=False`` (no flag). :func:`option` builds that metadata; it also marks the fields
whose value changes a run's result (``changes_result=True``; :func:`result_fields`), from which a run's identity is
made, so a rerun with another value into the same output is refused. Every flag refuses
NaN and infinities, whatever its type. The ``hf-mirror`` command and the benchmark recipes both build their
flags here.

A field whose type is itself a config dataclass is a group (``ScanConfig.ranking``): its fields get flat flags
(``--top-k``, not ``--ranking-top-k``) and flat names everywhere here, so flat names are unique across a config's
groups. :func:`flat_config` and :func:`nested_config` convert between a config and its flat ``{name: value}`` dict.

Importing this module loads neither torch nor the Hugging Face libraries.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["OFFLINE_ENV", "add_config_flags", "apply_overrides", "config_from_args", "finite", "flat_config",
           "flat_fields", "nested_config", "offline_defaults", "option", "result_fields", "result_settings"]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

C = TypeVar("C")


def offline_defaults() -> None:
    """Default to offline Hub and datasets access and no tokenizer parallelism; values already set win.

    Call it before importing transformers, datasets or huggingface_hub: they read these variables at import.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def option(default: Any = dataclasses.MISSING, *, help: str = "", min: float | None = None,  # noqa: A002
          flag: dict | None = None, cli: bool = True, changes_result: bool = False, keyed_at_default: bool = True,
          **kwargs: Any) -> Any:
    """``dataclasses.field`` with the help text, lower bound and flag options of its command-line flag.

    ``changes_result``: the field's value changes the run's result (not only how fast it is made), so it is part of
    the run's identity (:func:`result_settings`). ``keyed_at_default=False`` leaves such a field out of the identity
    while it holds its default: a field added after runs were recorded without it, whose outputs keep their identity.
    """
    if not keyed_at_default and not changes_result:
        raise ValueError("keyed_at_default only applies to a field marked changes_result=True")
    metadata = {"help": help, "min": min, "flag": flag or {}, "cli": cli, "changes_result": changes_result,
                "keyed_at_default": keyed_at_default}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _group(cls: type, f: dataclasses.Field) -> type | None:
    """The config dataclass that field ``f`` of ``cls`` holds (a group of flat fields), else None."""
    hint = _hints(cls).get(f.name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def flat_fields(cls: type) -> dict[str, tuple[tuple[str, ...], type, dataclasses.Field]]:
    """Every leaf field of config dataclass ``cls`` by its flat name: (path of group fields that lead to it, the
    dataclass that declares it, the field), in declaration order. Flat names are unique across groups."""
    out: dict[str, tuple[tuple[str, ...], type, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        group = _group(cls, f)
        inner = {name: ((f.name, *path), owner, g) for name, (path, owner, g) in flat_fields(group).items()} \
            if group is not None else {f.name: ((), cls, f)}
        if clash := out.keys() & inner.keys():
            raise TypeError(f"{cls.__name__}: the flat field names {sorted(clash)} appear in more than one group")
        out.update(inner)
    return out


def _leaves(cfg: Any) -> Iterable[tuple[str, Any, dataclasses.Field]]:
    """(flat name, value, field) of every leaf field of the config instance ``cfg``, in declaration order."""
    for name, (path, _, f) in flat_fields(type(cfg)).items():
        owner = cfg
        for step in path:
            owner = getattr(owner, step)
        yield name, getattr(owner, f.name), f


def flat_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` as one flat ``{field name: value}`` dict, its groups' fields inlined (values copied as
    ``dataclasses.asdict`` copies them): how a run records its config."""
    return {name: copy.deepcopy(value) for name, value, _ in _leaves(cfg)}


def nested_config(cls: type[C], flat: Mapping[str, Any]) -> C:
    """``cls`` from flat field names (``{"top_k": 5, "read": "forward"}``): each goes to the group that owns it, and
    the rest keep their defaults. A name that is no field of ``cls`` or its groups raises TypeError naming it."""
    known = flat_fields(cls)
    if unknown := [k for k in flat if k not in known]:
        raise TypeError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))} (its fields: "
                        f"{', '.join(known)})")
    return _build(cls, {name: (known[name][0], value) for name, value in flat.items()})


def _build(cls: type[C], routed: dict[str, tuple[tuple[str, ...], Any]]) -> C:
    """``cls`` from ``routed`` (flat name -> (path of groups below ``cls``, value))."""
    kwargs: dict[str, Any] = {}
    below: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {}
    for name, (path, value) in routed.items():
        if path:
            below.setdefault(path[0], {})[name] = (path[1:], value)
        else:
            kwargs[name] = value
    for f in dataclasses.fields(cls):
        if f.name in below:
            kwargs[f.name] = _build(_group(cls, f), below[f.name])
    return cls(**kwargs)


def result_fields(cls: type) -> tuple[str, ...]:
    """The fields of config dataclass ``cls`` marked ``changes_result`` (flat names, in declaration order)."""
    return tuple(name for name, (_, _, f) in flat_fields(cls).items() if f.metadata.get("changes_result", False))


def result_settings(cfg: Any) -> dict[str, Any]:
    """The values of ``cfg``'s fields that change a result, as they key a run (flat name -> value); a field marked
    ``keyed_at_default=False`` is left out while it equals its default."""
    out = {}
    for name, value, f in _leaves(cfg):
        if not f.metadata.get("changes_result", False):
            continue
        if not f.metadata.get("keyed_at_default", True) and value == _field_default(f):
            continue
        out[name] = value
    return out


def _finite(convert: Any) -> Any:
    """An argparse type that converts with ``convert`` and refuses a NaN or infinite float (argparse names the flag)."""
    def parse(text: str) -> Any:
        value = convert(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its messages
    return parse


finite = _finite(float)  # an argparse type: a finite float (for flags written by hand)


def _at_least(convert: Any, low: float) -> Any:
    """An argparse type that converts with ``convert`` and refuses values below ``low``."""
    def parse(text: str) -> Any:
        value = convert(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its messages
    return parse


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
                     hidden: bool = True, skip: Iterable[str] = (), defaults: bool = False,
                     only: Iterable[str] | None = None) -> None:
    """Add ``--field-name`` for every init field of dataclass ``cls`` (dest: the field name, default None).

    bool fields get ``--x``/``--no-x``; ``int``/``float``/``str``/``Path`` their type; ``Optional[X]`` the flag
    of ``X``; ``Literal[...]`` choices; ``list[X]``/``tuple[X, ...]`` one or more values. ``hidden`` leaves
    them out of ``--help``; ``skip`` names fields (``model_dir`` or ``--model-dir``) the caller gives flags
    of its own. ``defaults=True`` makes each flag's default the field's (the command line then holds a whole
    config; :func:`config_from_args` builds it); else flags default to None and :func:`apply_overrides`
    changes only what was given. ``only`` limits the flags to those fields. Raises TypeError for a field type
    with no flag, and ValueError for a ``skip``/``only`` name that is not a field.
    """
    leaves = flat_fields(cls)
    known = set(leaves)
    skipped = _names(skip) | (known - _names(only) if only is not None else set())
    if unknown := (_names(skip) | _names(only or ())) - known:
        raise ValueError(f"skip/only name no field of {cls.__name__}: {sorted(unknown)}")
    for name, (_, owner, f) in leaves.items():
        if not f.init or name in skipped or not f.metadata.get("cli", True):
            continue
        meta = f.metadata
        flag = meta.get("flag", {})  # a field with a flag type of its own is parsed by it alone
        hint = _hints(owner)[name]
        kwargs = {**({} if "type" in flag else _flag_kwargs(hint, f"{owner.__name__}.{name}")), **flag}
        if "type" in kwargs:  # every number a flag parses is finite: NaN and infinities are refused, naming the flag
            kwargs["type"] = _finite(kwargs["type"])
        if meta.get("min") is not None:
            kwargs["type"] = _at_least(kwargs.get("type", int), meta["min"])
        default = str(_field_default(f)).replace("%", "%%")
        text = meta.get("help", "").replace("%", "%%") or f"{owner.__name__}.{name}"
        help_text = argparse.SUPPRESS if hidden else text if defaults else f"{text} (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help_text,
                            default=_field_default(f) if defaults else None, **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """``cls`` from the flags :func:`add_config_flags` added (with ``defaults=True``), plus ``fixed`` fields (flat
    names, as the flags' dests)."""
    values = {name: getattr(args, name) for name, (_, _, f) in flat_fields(cls).items()
              if f.init and f.metadata.get("cli", True) and hasattr(args, name)}
    return nested_config(cls, {**values, **fixed})


def apply_overrides(cfg: C, args: argparse.Namespace, skip: Iterable[str] = ()) -> C:
    """Set every init field of dataclass ``cfg`` (its groups' fields included) whose value in ``args`` is not None
    (its flag was given).

    Changes ``cfg`` in place and returns it; a frozen dataclass comes back as a changed copy, so use the
    return value. ``skip`` names fields to leave alone even if ``args`` has a value under their name.
    """
    skipped = _names(skip)
    changes = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in skipped:
            continue
        if _group(type(cfg), f) is not None:
            group = getattr(cfg, f.name)
            if (changed := apply_overrides(group, args, skip)) is not group:
                changes[f.name] = changed
        elif (value := getattr(args, f.name, None)) is not None:
            changes[f.name] = value
    if not changes:
        return cfg
    if type(cfg).__dataclass_params__.frozen:
        return dataclasses.replace(cfg, **changes)
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg
