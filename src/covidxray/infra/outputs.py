"""Writing outputs safely: whole folders swapped in only once complete, scratch folders that a later
run recognises and removes when a killed run left them behind, and JSON-safe values.

A scratch folder is named `.<tag>-<pid>-<random>` and holds a marker file recording the host and
process that made it; a later run with the same tag removes those whose process is gone (and puts
back a previous output that a killed swap had set aside). Anything without the marker is not ours
and is never touched. A folder a tool owns (validate's reports) carries an owner file, so the tool
replaces its own earlier output but refuses to replace a folder it did not write.
"""

from __future__ import annotations

import json
import math
import os
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


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marker(folder: Path) -> dict | None:
    """A scratch folder's marker, or None when the folder is not a scratch folder of ours."""
    try:
        info = json.loads((folder / SCRATCH_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def clean_leftovers(parent: Path, tag: str) -> list[Path]:
    """Remove the scratch folders `.<tag>-*` in `parent` that a process of this machine, now gone,
    left behind; a previous output one of them had set aside is put back first if its place is
    empty. Returns the folders removed."""
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for folder in sorted(p for p in parent.iterdir() if p.name.startswith(f".{tag}-")):
        info = _marker(folder) if folder.is_dir() and not folder.is_symlink() else None
        if info is None or info.get("host") != socket.gethostname() or _alive(info["pid"]):
            continue
        old, target = folder / "old", parent / str(info.get("target") or "")
        if info.get("target") and (old.exists() or old.is_symlink()) and not (target.exists() or target.is_symlink()):
            os.rename(old, target)  # killed between the two renames of a swap: undo the first
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextmanager
def scratch_dir(parent: Path, tag: str, target: str | None = None) -> Iterator[Path]:
    """A new empty folder to work in, inside a marked scratch folder `.<tag>-<pid>-*` in `parent`
    (made if needed), all removed on exit; leftovers of earlier killed runs with the same tag are
    removed first. The work folder has the usual permissions (umask), not mkdtemp's 0700."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(parent, tag)
    folder = Path(tempfile.mkdtemp(prefix=f".{tag}-{os.getpid()}-", dir=parent))
    try:
        (folder / SCRATCH_MARKER).write_text(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "target": target}) + "\n"
        )
        (folder / "work").mkdir()
        yield folder / "work"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- replacing a folder whole ---------------------------------------------------------------------


def _owner(folder: Path) -> str | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


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


def _swap(new: Path, target: Path, old: Path) -> None:
    """Put `new` at `target`, setting what was there aside at `old` first; undone if the second
    rename fails."""
    if target.exists() or target.is_symlink():
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.rename(old, target)
        raise


def replace_dir(target: Path, write: Callable[[Path], T], *, by: str, owned: bool = False) -> T:
    """Call `write(folder)` on a fresh folder beside `target`, then swap it in whole; until that
    moment `target` stays as it was, and an error or a kill leaves no partial output (a killed
    run's scratch is removed by the next one). Returns what `write` returns.

    by: the command writing (names the scratch folder `.<target>.<by>-*`). owned: `target` is the
    command's own output folder, marked with an owner file; a folder without that mark is refused.
    """
    target = Path(target)
    if owned:
        check_replaceable(target, by)
    with scratch_dir(target.parent, f"{target.name}.{by}", target=target.name) as new:
        result = write(new)
        if owned:
            check_replaceable(target, by)
            (new / OWNER_FILE).write_text(json.dumps({"written_by": by}) + "\n")
        _swap(new, target, new.parent / "old")
        return result


# -- JSON -----------------------------------------------------------------------------------------


def json_safe(value, digits: int | None = None):
    """A copy of `value` that json.dumps writes as standard JSON: numpy scalars as Python numbers,
    NaN and infinities as null, tuples as lists, keys as strings; floats rounded to `digits` if given."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, digits) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return None
        return float(value) if digits is None else round(float(value), digits)
    return value
