"""An output directory is owned: ``hf_mirror.json`` names the command that wrote it, what it wrote there (every
file, at every depth) and which run it holds. One rule for every command that writes a folder (``attribute`` and
``demo``, ``index``, ``audit``, ``provenance``, ``memorization``; each a :class:`Kind`):

- A directory is used when it is empty, holds this command's manifest, or holds only the names this command wrote
  before manifests existed (adopted). Anything else is refused, with or without ``overwrite``, naming the files: a
  file the manifest does not list (inside ``shards/`` of a finished run too), another command's output, another
  command's staging folder. hf-mirror never writes next to files it did not write and never deletes one.
- The manifest records the run's identity (method or command, model, corpus and its content, probes, settings).
  Another run into a directory holding a result is refused with what changed, unless ``overwrite``.
- ``overwrite`` (and every ``index`` build) builds the new output in ``.hf_mirror-new/`` beside the old one and
  swaps it in by renames when it has finished, after validation; only the old manifest's entries go. A swap cut
  short is completed by the next command that opens the directory. An unfinished staged run is resumed only by the
  same run with ``overwrite``, or when finishing it replaces nothing else.
- ``hf_mirror.lock`` (``fcntl.flock``, held by the main process) keeps two runs off the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hf_mirror.errors import InputError
from hf_mirror.integrity import atomic_write, read_json

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

MANIFEST = "hf_mirror.json"
LOCK = "hf_mirror.lock"
STAGING = ".hf_mirror-new"  # an --overwrite run is built here, then swapped in
RETIRED = ".hf_mirror-old"  # the replaced run, during the swap
INTERNAL = frozenset({MANIFEST, MANIFEST + ".tmp", LOCK, STAGING, RETIRED})
RUN_ENTRIES = ("topk.parquet", "scores.parquet", "evidence.parquet", "probes.jsonl", "skipped.jsonl", "config.json",
               "shards", "adapters")  # what a run writes
ADOPTABLE = frozenset({*RUN_ENTRIES, "report.html", "demo.json"})  # an output of a version without manifests
FORMAT = "hf_mirror.output"
OVERWRITE = ("pass --overwrite (overwrite=True) to replace it (the new result is built beside it and swapped in when "
             "it has finished), or use a new --output directory")


def digest(value: object) -> str:
    """A short hash of a JSON-able value (probes, settings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _owned(name: str, entries: Iterable[str]) -> bool:
    entries = set(entries)
    return name in entries or name.endswith(".tmp") and name[:-4] in entries  # an interrupted atomic write


def _has_work(d: Path) -> bool:
    """Whether ``d`` holds a result or scan checkpoints (fitted adapters alone are refitted or reused freely)."""
    return (d / "config.json").exists() or any(f.is_file() for f in d.glob("shards/*/*"))


def _read_manifest(d: Path) -> dict | None:
    path = d / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and isinstance(manifest.get("entries"), list) and isinstance(manifest.get("run"), dict)):
            raise ValueError("not an hf-mirror manifest")
    except (ValueError, OSError) as e:
        raise InputError(f"{path} is damaged ({e}); delete {d} or use a new --output directory.") from e
    return manifest


def _write_manifest(d: Path, identity: dict, entries: Iterable[str], done: bool) -> None:
    manifest = {"format": FORMAT, "version": 1, "entries": sorted(set(entries)), "run": identity, "done": done}
    atomic_write(d / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())


def _contents(d: Path) -> tuple[dict | None, list[str], list[str]]:
    """``d``'s manifest, entries and owned entries; InputError when it holds anything hf-mirror did not write."""
    manifest = _read_manifest(d)
    names = sorted(p.name for p in d.iterdir() if p.name not in INTERNAL)
    entries = manifest["entries"] if manifest else [n for n in names if n in ADOPTABLE]
    foreign = [n for n in names if not _owned(n, entries)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"--output {d} holds files hf-mirror did not write ({shown}); it writes only into an empty "
                         "directory or one of its own results: use a new --output directory.")
    return manifest, names, entries


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two run identities, in words (a side that could not be known is not compared)."""
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if a is None or b is None or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{key} ({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in keys)})")
        elif key in ("method", "model", "processes"):
            out.append(f"{key} ({a} -> {b})")
        else:
            out.append(f"{key} changed")
    return out


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def writable(path: Path) -> bool:
    """Whether ``path`` (or, while it does not exist, the directory it would be created in) can be written."""
    return os.access(_existing(path), os.W_OK | os.X_OK)


def check_output_path(out: Path) -> None:
    """Refuse an output that is a file or cannot be written (before anything is loaded)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file; pass a directory (it is created if missing).")
    if not writable(out):
        raise InputError(f"Cannot write to {_existing(out)} (read-only); choose a writable --output directory.")


def _lock(out: Path) -> IO | None:
    if fcntl is None:
        return None
    try:
        handle = open(out / LOCK, "a+")  # noqa: SIM115 - held until the run ends
    except OSError as e:
        raise InputError(f"Cannot write to {out} ({e.strerror}); choose a writable --output directory.") from e
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise InputError(f"Another hf-mirror run (pid {pid}) is using {out}; wait for it to finish or use another "
                         "--output directory.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@dataclass
class Output:
    """The main process's hold on an output directory: the run writes to ``work``; its answer lands in ``final``."""

    final: Path
    work: Path
    identity: dict
    replaced: list[str] = field(default_factory=list)  # the entries of the run that ``work`` replaces when done
    _handle: IO | None = None

    @classmethod
    def open(cls, out: str | Path, identity: dict, overwrite: bool = False) -> Output:
        """Lock ``out``, check it holds nothing foreign and no other run, and pick where the run writes."""
        final = Path(out)
        check_output_path(final)
        if final.is_dir():
            _contents(final)  # refuse a foreign directory before the lock file is written into it
        try:
            final.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"Cannot create --output {final} ({e.strerror}).") from e
        handle = _lock(final)
        try:
            return cls._claim(final, identity, overwrite, handle)
        except BaseException:
            if handle is not None:
                handle.close()
            raise

    @classmethod
    def _claim(cls, final: Path, identity: dict, overwrite: bool, handle: IO | None) -> Output:
        manifest, names, entries = _contents(final)
        staging = final / STAGING
        staged = _read_manifest(staging) if staging.is_dir() else None
        if staged is not None and staged["run"] == identity and not staged.get("done"):
            return cls(final, staging, identity, entries, handle)  # an interrupted --overwrite run: resume it
        if not overwrite and _has_work(final):
            if manifest is None:
                raise InputError(f"--output {final} holds a result of an earlier hf-mirror version (no {MANIFEST}); "
                                 f"{OVERWRITE}.")
            changed = changes(manifest["run"], identity)
            if changed:
                state = "finished" if manifest.get("done") else "unfinished"
                raise InputError(f"--output {final} holds a different run ({state}): {'; '.join(changed)}; "
                                 f"{OVERWRITE}.")
        if overwrite and any(_owned(n, entries) for n in names):
            shutil.rmtree(staging, ignore_errors=True)  # ours, never a result
            staging.mkdir()
            _write_manifest(staging, identity, RUN_ENTRIES, done=False)
            return cls(final, staging, identity, entries, handle)
        _write_manifest(final, identity, [*entries, *RUN_ENTRIES], done=False)
        return cls(final, final, identity, [], handle)

    def finish(self) -> None:
        """Mark the run done; under ``overwrite`` swap it in for the old one (only the old manifest's entries go)."""
        entries = [*RUN_ENTRIES, *((_read_manifest(self.work) or {}).get("entries", []))]
        _write_manifest(self.work, self.identity, entries, done=True)
        if self.work != self.final:
            retired = self.final / RETIRED
            shutil.rmtree(retired, ignore_errors=True)
            retired.mkdir()
            for p in self.final.iterdir():
                if p.name not in INTERNAL and _owned(p.name, self.replaced):
                    os.replace(p, retired / p.name)
            for p in self.work.iterdir():
                if p.name != MANIFEST:
                    os.replace(p, self.final / p.name)
            os.replace(self.work / MANIFEST, self.final / MANIFEST)
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)
            self.work = self.final
        self.release()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None


def claim(directory: str | Path, names: Iterable[str]) -> None:
    """Add ``names`` (files written next to a result, e.g. the demo's report) to the directory's manifest."""
    d = Path(directory)
    manifest = _read_manifest(d)
    if manifest is not None:
        _write_manifest(d, manifest["run"], [*manifest["entries"], *names], manifest.get("done", False))
