"""Helpers for the files a run writes and later reads back: atomic writes, checksums, checked reads.

A reader validates before it uses: a file that fails is either repaired by its caller (fall back to an earlier
checkpoint, refit, recompute) or reported with :class:`~hf_mirror.errors.StateError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from hf_mirror.errors import StateError

T = TypeVar("T")
OVERWRITE_HINT = "pass --overwrite (or a new output directory) to start the run afresh"
VERIFY_ENV = "HF_MIRROR_VERIFY"  # "always": index checksums are read in full on every open (no remembered checks)
HOST = socket.gethostname().replace("/", "_").replace("-", "_")  # names this host's writers in temporary names


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expect(ok: bool, what: str) -> None:
    """Schema check: raise ``ValueError(what)`` unless ``ok`` (callers turn it into their own message)."""
    if not ok:
        raise ValueError(what)


def read_json(path: Path) -> object:
    """Parse a JSON file; raises ``ValueError``/``OSError`` on damage (callers decide whether to repair)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} is not valid JSON ({e})") from e


def damaged(path: Path, error: BaseException, fix: str = OVERWRITE_HINT) -> StateError:
    """The StateError for a file that is missing or damaged: names the file, what failed, and the fix."""
    reason = "missing" if isinstance(error, FileNotFoundError) else f"damaged ({type(error).__name__}: {error})"
    return StateError(f"{path} is {reason}; {fix}.")


def checked(path: Path, reader: Callable[[Path], T], fix: str = OVERWRITE_HINT) -> T:
    """``reader(path)``, with any failure (missing, truncated, corrupt) turned into a StateError naming the file."""
    try:
        return reader(path)
    except Exception as e:
        raise damaged(path, e, fix) from e


def check_hashes(root: Path, hashes: dict[str, str], stamps: Path | None = None) -> None:
    """Every file of ``hashes`` (paths relative to ``root``) exists with that sha256, else ``ValueError``.

    With ``stamps`` (a JSON file, one per ``root``), a file whose size, mtime, ctime and inode are those it had when it
    last passed with the same checksum is not read again, and every file that passes is recorded there: a large
    index is read in full once, not on every open. Any write to a file changes its ctime, which no tool can set
    back, so damage after the last check is still caught; only decay that leaves the file's metadata untouched
    (bit rot) is not. ``HF_MIRROR_VERIFY=always`` reads every file every time."""
    if os.environ.get(VERIFY_ENV, "").lower() == "always":
        stamps = None
    known = _read_stamps(stamps) if stamps is not None else {}
    passed = {}
    for name, digest in hashes.items():
        path = root / name
        expect(path.is_file(), f"{path} is missing")
        st = path.stat()  # before reading: a write during the check changes the stamp
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest]
        if known.get(name) != stamp:
            expect(sha256_file(path) == digest, f"{path} does not match its checksum")
        passed[name] = stamp
    if stamps is not None and any(known.get(k) != v for k, v in passed.items()):
        _write_stamps(stamps, {**known, **passed})


def _read_stamps(path: Path) -> dict:
    try:
        found = read_json(path)
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is read
    return found if isinstance(found, dict) else {}


def _write_stamps(path: Path, stamps: dict) -> None:
    """Best effort (a read-only cache only costs full checks); concurrent writers each replace the file whole."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp = f.name
            json.dump(stamps, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def hash_files(root: Path, paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to ``root`` (for :func:`check_hashes`)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in paths}


# ---------------------------------------------------------------- temporary siblings of a directory being written
def writer_dir(target: Path, kind: str) -> Path:
    """A new hidden directory beside ``target``, ``.<name>.<kind>-<host>-<pid>-<random>``, for a writer to fill
    and rename into place: its name says which process owns it, so that :func:`remove_dead_writers` can tell a
    killed writer's leftovers from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{HOST}-{os.getpid()}-", dir=target.parent))


def remove_dead_writers(target: Path, kinds: Iterable[str] = ("tmp", "old")) -> list[Path]:
    """Delete the :func:`writer_dir` directories of ``target`` whose process (on this host) is dead: what a kill
    during a save or a publish leaves. Returns what was removed."""
    removed = []
    for kind in kinds:
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            owner = path.name[len(f".{target.name}.{kind}-"):].split("-")
            if len(owner) == 3 and owner[0] == HOST and owner[1].isdigit() and not alive(int(owner[1])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
