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
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
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
               "shards", "adapters", "report.html")  # what a run writes
ADOPTABLE = frozenset({*RUN_ENTRIES, "report.html", "demo.json"})  # an output of a version without manifests
FORMAT = "hf_mirror.output"
VERSION = 2  # 2: the manifest lists every file ("files") and the command ("kind")
OVERWRITE = ("pass --overwrite (overwrite=True) to replace it (the new result is built beside it and swapped in when "
             "it has finished), or use a new --output directory")


def _attribute_work(d: Path) -> bool:
    """Whether ``d`` holds a result or scan checkpoints (fitted adapters alone are refitted or reused freely)."""
    return (d / "config.json").exists() or any(f.is_file() for f in d.glob("shards/*/*"))


@dataclass(frozen=True)
class Kind:
    """What one command writes at the top of its output directory."""

    command: str
    entries: tuple[str, ...]
    _: KW_ONLY
    adoptable: frozenset[str] = frozenset()  # names of its output before manifests existed (taken as its own)
    legacy: Callable[[Path], bool] | None = None  # whether a directory of adoptable names is really its output
    has_work: Callable[[Path], bool] | None = None  # whether a directory holds a result (default: any entry)
    stage: bool = False  # always build in the staging folder: a reader never sees a half-built output
    marker: str | None = None  # the entry a reader opens first: moved out first and in last by a swap

    def holds_work(self, d: Path) -> bool:
        if self.has_work is not None:
            return self.has_work(d)
        return any((d / name).exists() for name in self.entries)


def _attribute_legacy(d: Path) -> bool:
    """Whether a directory of adoptable names is an attribution of a version without manifests: it holds what a run
    writes first (its config, checkpoints or mirrors), not only a report.html or demo.json someone put there."""
    return (d / "config.json").is_file() or (d / "shards").is_dir() or (d / "adapters").is_dir()


# attribute's (and demo's, audit's and provenance's mirror runs)
ATTRIBUTE = Kind("attribute", RUN_ENTRIES, adoptable=ADOPTABLE, legacy=_attribute_legacy, has_work=_attribute_work,
                 marker="config.json")
AUDIT = Kind("audit", ("report.json", "report.html", "index", "mirror"), marker="report.json")
PROVENANCE = Kind("provenance", ("provenance.json", "provenance.html", "index", "attribution"),
                  marker="provenance.json")
MEMORIZATION = Kind("memorization", ("memorization.json",), marker="memorization.json")


def digest(value: object) -> str:
    """A short hash of a JSON-able value (probes, settings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _owned(name: str, entries: Iterable[str]) -> bool:
    """An entry, its interrupted atomic write (``NAME.tmp``) or a hidden folder a writer of it keeps beside it
    (``.NAME.build``, ``.NAME.tmp-HOST-PID-*``)."""
    entries = set(entries)
    return (name in entries or name.endswith(".tmp") and name[:-4] in entries
            or name.startswith(".") and any(name.startswith(f".{e}.") for e in entries))


def _tree(d: Path, entries: Iterable[str]) -> list[str]:
    """Every file (or link) under ``d``'s owned entries, as paths relative to ``d``, hf-mirror's own files left out."""
    out = []
    for top in sorted(p for p in d.iterdir() if p.name not in INTERNAL and _owned(p.name, entries)):
        paths = [top] if top.is_symlink() or not top.is_dir() else sorted(top.rglob("*"))
        for p in paths:
            rel = p.relative_to(d)
            if (p.is_symlink() or not p.is_dir()) and not INTERNAL.intersection(rel.parts):
                out.append(rel.as_posix())
    return out


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


def _kind_of(manifest: dict) -> str:
    return str(manifest.get("kind", ATTRIBUTE.command))  # a manifest before version 2: attribute's


def _write_manifest(d: Path, command: str, identity: dict, entries: Iterable[str], done: bool,
                    files: Iterable[str] | None) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "kind": command, "entries": sorted(set(entries)),
                "run": identity, "done": done, "files": None if files is None else sorted(set(files))}
    atomic_write(d / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _contents(d: Path, kind: Kind) -> tuple[dict | None, list[str], list[str]]:
    """``d``'s manifest, names and owned entries; InputError naming what ``kind``'s command did not write there."""
    manifest = _read_manifest(d)
    names = sorted(p.name for p in d.iterdir() if p.name not in INTERNAL)
    staged = _read_manifest(d / STAGING) if (d / STAGING).is_dir() else None
    theirs = [m for m in (manifest, staged) if m is not None and _kind_of(m) != kind.command]
    if theirs:
        other = _kind_of(theirs[0])
        shown = _shown((names or [MANIFEST]) if manifest is theirs[0] else [STAGING])
        raise InputError(f"--output {d} holds the output of `hf-mirror {other}` ({shown}), which `hf-mirror "
                         f"{kind.command}` never writes into or replaces; use a new --output directory.")
    if manifest is not None:
        entries = manifest["entries"]
    else:
        entries = [n for n in names if n in kind.adoptable]
        if entries and kind.legacy is not None and not kind.legacy(d):
            entries = []
    foreign = [n for n in names if not _owned(n, entries)]
    listed = manifest.get("files") if manifest is not None and manifest.get("done") else None
    if listed is not None:  # a finished run lists every file it wrote, at every depth
        known = set(listed)
        foreign += [f for f in _tree(d, entries) if f not in known and "/" in f]
    if foreign:
        raise InputError(f"--output {d} holds files hf-mirror did not write ({_shown(foreign)}); it writes only into "
                         "an empty directory or one of its own results: use a new --output directory.")
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


def _swap_pending(final: Path, kind: Kind) -> bool:
    staged = _read_manifest(final / STAGING) if (final / STAGING).is_dir() else None
    return staged is not None and bool(staged.get("done")) and _kind_of(staged) == kind.command


def _swap(final: Path, kind: Kind) -> None:
    """Move the finished run in ``.hf_mirror-new/`` into ``final`` in place of the previous one (only the entries of
    the previous manifest go): the reader's entry point (``kind.marker``) out first and in last, the manifest last,
    so a reader sees the old output, the new one or none, never a mix. Safe to repeat: a swap cut short is
    completed by running it again, which the next command that opens ``final`` does."""
    staging, retired = final / STAGING, final / RETIRED
    new = _read_manifest(staging)
    old = _read_manifest(final)
    new_top = {f.split("/")[0] for f in new.get("files") or []} | {p.name for p in staging.iterdir()}
    # without a manifest: an adopted output, or a first run
    old_entries = old["entries"] if old is not None else [p.name for p in final.iterdir() if p.name in kind.adoptable]
    retired.mkdir(exist_ok=True)

    def retire(name: str) -> None:
        if (final / name).exists() or (final / name).is_symlink():
            shutil.rmtree(retired / name, ignore_errors=True)
            os.replace(final / name, retired / name)

    last = [kind.marker] if kind.marker is not None and (staging / kind.marker).exists() else []
    for name in last:  # still in staging: the one in final is the previous run's
        retire(name)
    for p in sorted(staging.iterdir()):
        if p.name not in (MANIFEST, *last):
            retire(p.name)
            os.replace(p, final / p.name)
    for p in sorted(final.iterdir()):  # the previous run's entries that the new run does not write
        if p.name not in INTERNAL and p.name not in new_top and _owned(p.name, old_entries):
            retire(p.name)
    for name in last:
        os.replace(staging / name, final / name)
    os.replace(staging / MANIFEST, final / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


@dataclass(kw_only=True)
class Output:
    """The main process's hold on an output directory: the run writes to ``work``; its answer lands in ``final``."""

    final: Path
    work: Path
    identity: dict
    kind: Kind = ATTRIBUTE
    _handle: IO | None = None

    @classmethod
    def check(cls, out: str | Path, identity: dict | None, overwrite: bool = False, kind: Kind = ATTRIBUTE) -> None:
        """Refuse, reading only, what :meth:`open` would refuse (a command that writes only at its end calls it
        first, and :meth:`open` when it writes); without ``identity``, only files ``kind`` did not write."""
        final = Path(out)
        check_output_path(final)
        if final.is_dir() and not _swap_pending(final, kind):
            found = _contents(final, kind)
            if identity is not None:
                cls._refusal(final, identity, overwrite, kind, *found)

    @classmethod
    def open(cls, out: str | Path, identity: dict, overwrite: bool = False, kind: Kind = ATTRIBUTE) -> Output:
        """Lock ``out``, check it holds nothing foreign and no other run, and pick where the run writes."""
        final = Path(out)
        check_output_path(final)
        if final.is_dir() and not _swap_pending(final, kind):
            _contents(final, kind)  # refuse a foreign directory before the lock file is written into it
        try:
            final.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"Cannot create --output {final} ({e.strerror}).") from e
        handle = _lock(final)
        try:
            return cls._claim(final, identity, overwrite, kind, handle)
        except BaseException:
            if handle is not None:
                handle.close()
            raise

    @staticmethod
    def _refusal(final: Path, identity: dict, overwrite: bool, kind: Kind, manifest: dict | None, names: list[str],
                 entries: list[str]) -> bool:
        """InputError when a run without ``overwrite`` would replace another one; whether a staged run may resume."""
        staged = _read_manifest(final / STAGING) if (final / STAGING).is_dir() else None
        resumable = staged is not None and staged["run"] == identity and not staged.get("done")
        if overwrite or not kind.holds_work(final):
            return resumable
        if manifest is None:
            raise InputError(f"--output {final} holds a result of an earlier hf-mirror version (no {MANIFEST}); "
                             f"{OVERWRITE}.")
        changed = changes(manifest["run"], identity)
        if changed:
            state = "finished" if manifest.get("done") else "unfinished"
            staged_note = (f" (the interrupted --overwrite run in {final / STAGING} is this run: pass --overwrite to "
                           "finish it and replace the result)") if resumable else ""
            raise InputError(f"--output {final} holds a different run ({state}): {'; '.join(changed)}; "
                             f"{OVERWRITE}{staged_note}.")
        return resumable

    @classmethod
    def _claim(cls, final: Path, identity: dict, overwrite: bool, kind: Kind, handle: IO | None) -> Output:
        if _swap_pending(final, kind):
            _swap(final, kind)  # an --overwrite run that finished and was cut short during its swap
        manifest, names, entries = _contents(final, kind)
        staging = final / STAGING
        if cls._refusal(final, identity, overwrite, kind, manifest, names, entries):
            # an interrupted staged run of this command: resume
            return cls(final=final, work=staging, identity=identity, kind=kind, _handle=handle)
        if kind.stage or overwrite and any(_owned(n, entries) for n in names):
            shutil.rmtree(staging, ignore_errors=True)  # ours, never a result
            staging.mkdir()
            _write_manifest(staging, kind.command, identity, kind.entries, False, None)
            return cls(final=final, work=staging, identity=identity, kind=kind, _handle=handle)
        if staging.is_dir() and _read_manifest(staging) is None:
            shutil.rmtree(staging, ignore_errors=True)  # what a swap left after moving its manifest
        _write_manifest(final, kind.command, identity, [*entries, *kind.entries], False, None)
        return cls(final=final, work=final, identity=identity, kind=kind, _handle=handle)

    def finish(self) -> None:
        """Mark the run done, listing every file it wrote; when staged, swap it in for the previous one."""
        entries = [*self.kind.entries, *((_read_manifest(self.work) or {}).get("entries", []))]
        _write_manifest(self.work, self.kind.command, self.identity, entries, True, _tree(self.work, entries))
        if self.work != self.final:
            _swap(self.final, self.kind)
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


def open_shared(out: str | Path, identity: dict | None, overwrite: bool, kind: Kind) -> tuple[Output | None, Path]:
    """:meth:`Output.open` on the main process (``identity`` is only read there); every process gets the directory
    the run writes to."""
    from hf_mirror.distributed import launched_world, process_state

    output = Output.open(out, identity or {}, overwrite, kind) if launched_world() <= 1 or \
        process_state().is_main_process else None
    work = [None if output is None else str(output.work)]
    if launched_world() > 1:
        from accelerate.utils import broadcast_object_list

        try:
            work = broadcast_object_list(work, from_process=0)
        except BaseException:
            if output is not None:
                output.release()
            raise
    return output, Path(work[0])


def claim(directory: str | Path, names: Iterable[str]) -> None:
    """Add ``names`` (files written next to a result, e.g. the demo's report) to the directory's manifest."""
    d = Path(directory)
    manifest = _read_manifest(d)
    if manifest is not None:
        files = manifest.get("files")
        _write_manifest(d, _kind_of(manifest), manifest["run"], [*manifest["entries"], *names],
                        manifest.get("done", False), None if files is None else [*files, *names])
