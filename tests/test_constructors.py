"""Wide constructors are keyword-only: every class of hf_mirror whose constructor takes more than 4 parameters takes at
most its first 2 by position (``Corpus(source, text_column=...)``, ``ScoreBook(probe_ids, sign=..., ...)``), so a
call names what it passes and a new parameter cannot shift the others."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hf_mirror

WIDE = 4  # more parameters than this: keyword-only beyond the first POSITIONAL
POSITIONAL = 2


def _classes() -> list[type]:
    out = []
    for info in pkgutil.walk_packages(hf_mirror.__path__, "hf_mirror."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not issubclass(cls, BaseException) and _own_init(cls):
                out.append(cls)
    return out


def _own_init(cls: type) -> bool:
    """Whether ``cls``'s constructor is the package's (not inherited from argparse, torch, ...)."""
    owner = next((c for c in cls.__mro__ if "__init__" in c.__dict__), object)
    return owner.__module__.startswith("hf_mirror")


def _positional(cls: type) -> tuple[int, int]:
    """(parameters, of which positional) of ``cls``'s constructor."""
    params = list(inspect.signature(cls).parameters.values())
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(params), sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def test_wide_constructors_are_keyword_only():
    classes = _classes()
    assert len(classes) > 40  # the walk found the package
    wide = {f"{c.__module__}.{c.__qualname__}": _positional(c) for c in classes if _positional(c)[0] > WIDE}
    assert {"hf_mirror.scoring.ScoreBook", "hf_mirror.scan.Scanner", "hf_mirror.pipeline._Run",
            "hf_mirror.results.AttributionResult", "hf_mirror.config.ScanConfig"} <= set(wide)
    positional = {name: n for name, (_, n) in wide.items() if n > POSITIONAL}
    assert not positional, f"make these keyword-only past their first {POSITIONAL} parameters: {positional}"
