"""The docstrings corpus's raw text: first paragraphs of standard-library docstrings (standard library only).

Run as a script (``python -I -S benchmarks/docstrings.py``) it prints :func:`read_pool` as JSON; that is how
:func:`benchmarks.lds.docstring_pool` reads it, in an interpreter where nothing else was imported (torch, for one,
replaces ``inspect.getfile`` when imported, which would drop that entry).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Sequence

# Standard-library modules whose public functions and classes give the corpus (in this order).
MODULES = (
    "os.path", "shutil", "json", "re", "textwrap", "string", "collections", "itertools", "functools", "heapq",
    "bisect", "statistics", "fractions", "difflib", "math", "cmath", "random", "copy", "glob", "fnmatch", "csv",
    "base64", "binascii", "hashlib", "hmac", "operator", "datetime", "calendar", "pathlib", "tempfile", "zipfile",
    "tarfile", "gzip", "zlib", "io", "uuid", "secrets", "pprint", "urllib.parse", "html", "argparse", "logging",
    "decimal", "inspect", "contextlib", "dataclasses", "enum", "abc", "numbers", "queue", "threading",
    "subprocess", "struct", "codecs", "unicodedata", "weakref", "types", "ast", "tokenize", "shlex",
    "configparser", "email.utils", "mimetypes", "graphlib", "ipaddress", "traceback", "warnings", "pickle",
    "linecache", "filecmp", "sched", "typing",
)
SIGNATURE = re.compile(r"^[\w.]+\(|-->|->|^\w+ = ")  # a first paragraph that is a call signature, not prose


def read_pool(modules: Sequence[str] = MODULES, shortest: int = 40, longest: int = 300) -> list[tuple[str, str]]:
    """``(qualified name, text)`` of every public function or class of ``modules`` (``__all__``, else the names
    without a leading underscore; sorted) defined in its module or the module's C accelerator (``_name``) whose
    docstring's first paragraph (:func:`inspect.getdoc`, whitespace collapsed) has ``shortest`` to ``longest``
    characters, is not a call signature and was not seen before (dedupe on the text). Module order, then name
    order."""
    seen, pool = set(), []
    for name in modules:
        module = importlib.import_module(name)
        homes = {name, module.__name__, "_" + name.rsplit(".", 1)[-1], "_" + module.__name__}
        public = getattr(module, "__all__", None)
        names = sorted(set(public) if public is not None else (n for n in dir(module) if not n.startswith("_")))
        for attr in names:
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) if getattr(obj, "__module__", None) in homes else None
            if not doc:
                continue
            text = " ".join(doc.strip().split("\n\n")[0].split())
            if not shortest <= len(text) <= longest or SIGNATURE.search(text) or text in seen:
                continue
            seen.add(text)
            pool.append((f"{name}.{attr}", text))
    return pool


if __name__ == "__main__":
    json.dump(read_pool(), sys.stdout)
