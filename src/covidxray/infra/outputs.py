"""Writing outputs safely: whole folders swapped in only once complete, scratch folders that a later
run recognises and removes when a killed run left them behind, and JSON-safe values.

A scratch folder is named `.<tag>-<pid>-<random>` and holds a marker file recording the host and
process that made it; a later run with the same tag removes those whose process is gone (and puts
back a previous output that a killed swap had set aside). Anything without the marker is not ours
and is never touched. A folder a tool owns (validate's reports) carries an owner file, so the tool
replaces its own earlier output but refuses to replace a folder it did not write.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from covidxray import CovidXrayError

SCRATCH_MARKER = ".covidxray-scratch"  # in a scratch folder: {"host", "pid", "target"}
OWNER_FILE = ".covidxray-output"  # in an output folder a tool owns: {"written_by": tool}
T = TypeVar("T")


# -- scratch folders and their leftovers ------------------------------------------------------------


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` exists on this machine (and, given `start`, is the one that started
    then: a reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = process_start(pid) if start else None
    return not (start and now and now != start)


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc), None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _marker(folder: Path) -> dict | None:
    """A scratch folder's marker, or None when the folder is not a scratch folder of ours."""
    info = _read_json_or_none(folder / SCRATCH_MARKER)
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def clean_leftovers(parent: Path, tag: str) -> list[Path]:
    """Remove the scratch folders `.<tag>-*` in `parent` that a process of this machine, now gone,
    left behind; previous outputs one of them had set aside are put back first where their place
    is empty. Returns the folders removed."""
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for folder in sorted(p for p in parent.iterdir() if p.name.startswith(f".{tag}-")):
        info = _marker(folder) if folder.is_dir() and not folder.is_symlink() else None
        if info is None or info.get("host") != socket.gethostname() or process_alive(info["pid"]):
            continue
        for name in info.get("targets") or []:
            old, target = folder / "old" / str(name), parent / str(name)
            if (old.exists() or old.is_symlink()) and not (target.exists() or target.is_symlink()):
                os.rename(old, target)  # killed between the renames of a swap: undo the first
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextmanager
def scratch_dir(parent: Path, tag: str, targets=()) -> Iterator[Path]:
    """A new empty folder to work in, inside a marked scratch folder `.<tag>-<pid>-*` in `parent`
    (made if needed), all removed on exit; leftovers of earlier killed runs with the same tag are
    removed first. `targets`: the names in `parent` a swap may set aside (see clean_leftovers).
    The work folder has the usual permissions (umask), not mkdtemp's 0700."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(parent, tag)
    folder = Path(tempfile.mkdtemp(prefix=f".{tag}-{os.getpid()}-", dir=parent))
    try:
        (folder / SCRATCH_MARKER).write_text(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "targets": list(targets)}) + "\n"
        )
        (folder / "work").mkdir()
        yield folder / "work"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_failure(err: BaseException) -> tuple[str | None, str] | None:
    """(the file, why) of a write that failed for want of room or rights, None for other errors.
    A failed copy of a folder (shutil.Error) keeps each file's error only as text, "[Errno 28] No
    space left on device: ...", one per file (a long list): the first such file, and how many more."""
    if isinstance(err, shutil.Error):
        rows = [row for row in (err.args[0] if err.args and isinstance(err.args[0], list) else []) if len(row) == 3]
        failed = [(dst, m) for _, dst, why in rows if (m := re.match(r"\[Errno (\d+)\] ([^:]+)", str(why)))]
        failed = [(dst, m.group(2)) for dst, m in failed if int(m.group(1)) in WRITE_ERRNOS]
        more = f" (and {len(rows) - 1} more files)" if len(rows) > 1 else ""
        return (str(failed[0][0]), failed[0][1] + more) if failed else None
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return (str(err.filename) if err.filename else None), err.strerror or os.strerror(err.errno)
    return None


@contextmanager
def naming_writes(where: Path, what: str) -> Iterator[None]:
    """A write inside the block that fails for want of room or rights (disk full, quota, file
    size limit, read-only, no permission; a copy of a folder: shutil.Error) as one line naming the
    file (else `where`) and what was being written; the writers' own clean-up (scratch folders,
    staging) has run by then."""
    try:
        yield
    except OSError as err:
        failed = write_failure(err)
        if failed is None:
            raise
        raise CovidXrayError(f"cannot write {what} to {failed[0] or where}: {failed[1]}") from None


def ensure_room(folder: Path, nbytes: int, what: str) -> None:
    """Fail early, in one line naming the folder, where `folder` cannot take `nbytes` more (disk
    full, read-only, no permission, a file size limit): for writers that would fail deep inside a
    library with an unrelated error (TensorFlow's TFLite converter hides a full TMPDIR behind
    `TypeError: 'NoneType' object is not callable`). Reserves the bytes once, then frees them."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            os.posix_fallocate(probe.fileno(), 0, max(1, int(nbytes)))
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:  # a file system that cannot reserve (EINVAL...): just try
            return
        reason = error.strerror or type(error).__name__
        raise CovidXrayError(f"{what}: cannot write {nbytes / 1e6:.1f} MB to {folder}: {reason}") from None


# -- replacing outputs whole ----------------------------------------------------------------------


def _owner(folder: Path) -> str | None:
    found = _read_json_or_none(folder / OWNER_FILE)
    return found.get("written_by") if isinstance(found, dict) else None


def check_replaceable(target: Path, by: str) -> None:
    """Refuse to replace `target` unless it is absent, an empty folder, or an earlier output of `by`."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CovidXrayError(
            f"refusing to replace {target}: it is not a folder {by} wrote; choose another output folder"
        )
    if target.is_dir() and any(target.iterdir()) and _owner(target) != by:
        raise CovidXrayError(
            f"refusing to replace {target}: a non-empty folder that {by} did not write "
            f"(no {OWNER_FILE} of {by} in it); choose a new or empty output folder"
        )


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _swap(pairs: list[tuple[Path, Path]], old: Path) -> None:
    """Put each `new` at its `target`, setting what was there aside in the folder `old` first;
    all undone if a rename fails."""
    old.mkdir(exist_ok=True)
    done: list[tuple[Path, Path]] = []
    try:
        for new, target in pairs:
            if _exists(target):
                os.rename(target, old / target.name)
            os.rename(new, target)
            done.append((new, target))
    except BaseException:
        for new, target in reversed(done):
            os.rename(target, new)
        for _, target in pairs:
            if _exists(old / target.name) and not _exists(target):
                os.rename(old / target.name, target)
        raise


def replace_dir(target: Path, write: Callable[[Path], T], *, by: str, owned: bool = False, names=None) -> T:
    """The one way outputs are written: call `write(folder)` on a fresh folder beside `target`,
    then swap the result in; until that moment `target` stays as it was, and an error or a kill
    leaves no partial output (a killed run's scratch is removed, and what a killed swap had set
    aside is put back, by the next run). Returns what `write` returns.

    names: None replaces the folder `target` whole; otherwise `write` makes these entries (files
    or folders) and only they are replaced in `target`, the rest of it left alone (one file:
    `names=[path.name]` in `path.parent`). by: the command writing (names the scratch folder).
    owned: `target` is the command's own output folder, marked with an owner file; a folder
    without that mark is refused.
    """
    target = Path(target)
    if owned:
        check_replaceable(target, by)
    whole = names is None
    parent, tag = (target.parent, f"{target.name}.{by}") if whole else (target, by)
    targets = [target.name] if whole else [str(n) for n in names]
    with naming_writes(target, f"{by}'s output"), scratch_dir(parent, tag, targets=targets) as new:
        result = write(new)
        if owned:
            check_replaceable(target, by)
            (new / OWNER_FILE).write_text(json.dumps({"written_by": by}) + "\n")
        missing = [] if whole else [n for n in targets if not _exists(new / n)]
        if missing:
            raise CovidXrayError(f"{by} did not write {', '.join(missing)} into {target}")
        pairs = [(new, target)] if whole else [(new / n, target / n) for n in targets]
        _swap(pairs, new.parent / "old")
        return result


# -- JSON -----------------------------------------------------------------------------------------


# Significant digits of the figures in the files the pipeline writes (metrics, headline, details,
# audit): an AUC, a threshold or a rate means no more than 4 (its bootstrap interval is wider than
# 1e-3), and the last bits differ between CPUs (oneDNN, XNNPACK), so 16 digits would make a rerun on
# another machine rewrite every file. MLflow keeps the full precision.
FIGURE_DIGITS = 4


def significant(x: float, digits: int = FIGURE_DIGITS) -> float:
    """x rounded to `digits` significant digits: 0.459753155708313 -> 0.4598, 0.000123456 -> 0.0001235."""
    return float(f"{x:.{digits}g}")


def json_safe(value, digits: int | None = None):
    """A copy of `value` that json.dumps writes as standard JSON: numpy scalars as Python numbers,
    NaN and infinities as null, tuples as lists, keys as strings; floats rounded to `digits`
    significant digits if given (integers and whole floats, counts and sizes, are kept whole)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, digits) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return None
        whole = float(value).is_integer()  # a count or a size held as a float: kept as it is
        return float(value) if digits is None or whole else significant(float(value), digits)
    return value


def figures_text(value, sort_keys: bool = False) -> str:
    """The text of a figures file (metrics.json, headline.json, details.json, audit.json): standard
    JSON with every float at FIGURE_DIGITS significant digits, so a rerun on another CPU leaves it
    unchanged in the common case."""
    return json.dumps(json_safe(value, FIGURE_DIGITS), indent=2, sort_keys=sort_keys) + "\n"


def read_json(path: Path, *, required: bool = True):
    """The one JSON reader: a file's value; an absent file is an error naming it (None when not
    `required`), and a file that is not JSON is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        if not required:
            return None
        raise CovidXrayError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CovidXrayError(f"{path}: not valid JSON ({' '.join(str(err).split())[:200]})") from None


def _read_json_or_none(path: Path):
    """A marker file's value, None where it is absent, unreadable or not JSON (then it is not ours)."""
    try:
        return read_json(path)
    except (CovidXrayError, OSError):
        return None
