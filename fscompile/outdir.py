"""Atomic output directories: everything is written beside ``--out`` and renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

MANIFEST = "manifest.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove staging directories left beside ``out`` by a process that was killed (kill -9)."""
    for tmp in out.parent.glob(f".{out.name}.fscompile-*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdecimal() or _alive(int(pid)):
            continue
        if ".fscompile-old-" in tmp.name and not out.exists():
            tmp.rename(out)  # killed between the two renames: the previous run comes back
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse an ``--out`` that holds something else, unless ``force``; fail before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        try:
            previous = json.loads((out / MANIFEST).read_text())
            # a budget search's output is the winning trial's manifest, with the search's own fingerprint
            same = fingerprint in (previous.get("fingerprint"), (previous.get("search") or {}).get("fingerprint"))
        except (OSError, ValueError):
            same = False
        if not same:
            raise InputError(f"--out {out} already holds a different run (or other files); "
                             "choose another directory or pass --force to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create {parent}: {e.strerror}") from None
    # os.access says yes to root everywhere (/proc included): make and remove a real directory
    # where the staging one will go, so an unwritable place fails now, not after the compile
    probe = parent / f".{out.name}.fscompile-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    clean_stale(out)


def dir_mb(path: Path, pattern: str) -> float:
    """Size in MB of the files in ``path`` matching ``pattern``."""
    return sum(p.stat().st_size for p in path.glob(pattern)) / 2**20


def check_space(out: Path, teacher_files: list[Path], factor: float = 3.0) -> None:
    """Refuse before any work when the disk beside ``out`` cannot hold roughly ``factor`` times the
    teacher's weights (the staged artifact, plus teacher and student saved for profiling): a full
    disk found at the last rename wastes the whole compile. Teachers not on disk are not checked."""
    need = factor * sum(p.stat().st_size for p in teacher_files if p.is_file())
    free = shutil.disk_usage(out.parent).free
    if need and free < need:
        raise InputError(f"--out {out}: {free / 2**20:,.0f} MB free in {out.parent}, the compile needs about "
                         f"{need / 2**20:,.0f} MB ({factor:g}x the teacher's weights); free some space or choose another place")


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``--out`` for this process: a second compile into the same place fails at once, in
    one line, instead of racing this one to the rename (the lock dies with the process)."""
    import fcntl

    lock = out.parent / f".{out.name}.fscompile-lock"
    try:
        f = lock.open("a+")
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"--out {out} is being written by another fscompile (pid {f.read().strip() or '?'}); "
                             "wait for it or choose another directory") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a sibling temporary directory; on success it replaces ``out`` in one rename,
    on any failure (Ctrl-C included) it is removed and ``out`` is left untouched."""
    tmp = out.parent / f".{out.name}.fscompile-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise InputError(f"cannot write beside --out {out}: {e.strerror}") from None
    try:
        yield tmp
        old = out.parent / f".{out.name}.fscompile-old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():  # put the previous run back
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
