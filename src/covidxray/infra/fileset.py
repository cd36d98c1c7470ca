"""Files that belong together change together, also when the process is killed.

`install_together(folders)` gives one staging folder inside each destination folder; what the
block writes there replaces the files of the same names in the destinations when the block ends
without error. The switch is journaled: once every staged file is complete, a journal listing
the moves is written (the commit point), then the files are renamed into place one by one. A
process killed before the journal leaves the old files untouched; one killed after it leaves a
journal that `finish_pending` (run by every reader of the files, models.load_model) and
`recover` (run by the next writer) complete. So a reader sees the old set or the new set, never
a mixture: models/model.keras always beside its own model.json and reports/cv/.

Each staging folder is named `.install-<token>` and holds an `owner` file its writer keeps
locked (fcntl) while alive; a folder whose lock is free belongs to a dead writer.

Writers of the same folders take turns: a writer lock (filelock on `.install.lock` in each
destination folder, taken in one order) is held while recovering and creating the staging
folders, and while committing and installing; not while the block writes (a whole training).
So two trainings that finish together install one after the other, never a mixture, and no
writer's `recover` takes another's fresh staging folder for a dead one. A writer that cannot
have the lock within LOCK_WAIT_S stops with one line.

The journal records the sha256 of every file it moves. Before a journal left by a dead writer is
carried out, each move is checked: its file still staged with that digest, or already in place
with it. A journal whose files no longer match (the destination was restored meanwhile, e.g. by
`dvc checkout`, or a staged file was damaged) is stale: it is discarded with its staging folders,
never applied, so it cannot pair one run's model.keras with another run's model.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from covidxray.infra.outputs import naming_writes

PREFIX = ".install-"
JOURNAL = "journal.json"
OWNER = "owner"
WRITER_LOCK = ".install.lock"  # in each destination folder
LOCK_WAIT_S = 300.0  # how long a writer waits for another's install (milliseconds, or a slow disk)
PAUSE_AT = "COVIDXRAY_PAUSE_AT"  # tests: sleep at this point of an install (staged | committed | installing)
PAUSE_FILE = "COVIDXRAY_PAUSE_FILE"  # ...after writing the process id here


def _pause(point: str) -> None:
    """A test hook: stop at an install point so that a test can kill the process there."""
    if os.environ.get(PAUSE_AT) == point:
        Path(os.environ[PAUSE_FILE]).write_text(str(os.getpid()))
        time.sleep(3600)


def _lock(path: Path, blocking: bool):
    """An open file holding an exclusive lock on path, or None when another process holds it
    (non-blocking) or the file is gone."""
    try:
        handle = open(path, "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        handle.close()
        return None
    return handle


def _sync(path: Path) -> None:
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _digest(path: Path) -> str | None:
    """sha256 of a file's bytes, None if it is not a file."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_moves(journal: Path) -> list[str]:
    """The destinations of a journal's moves that can no longer be carried out as recorded: the
    file is neither still staged with its digest nor already in place with it (empty: valid)."""
    base = journal.parent
    entry = json.loads(journal.read_text())
    digests = entry.get("sha256") or {}
    stale = []
    for src, dst in entry["moves"]:
        if src is None or src not in digests:
            continue
        if _digest(base / src) != digests[src] and _digest(base / dst) != digests[src]:
            stale.append(os.path.normpath(base / dst))
    return stale


def _discard(journal: Path, stale: list[str]) -> None:
    """Drop a stale journal and its staging folders, saying so on stderr."""
    base = journal.parent
    entry = json.loads(journal.read_text())
    print(
        f"warning: discarded a stale install journal {journal}: {', '.join(stale[:3])} changed since it was written",
        file=sys.stderr,
    )
    journal.unlink()
    for folder in entry["staging"]:  # normalised first: "a/.install-x/../../b/.install-x" needs a/.install-x
        shutil.rmtree(os.path.normpath(base / folder), ignore_errors=True)


def _apply(journal: Path, check: bool = False) -> None:
    """Carry out a journal's moves (each at most once: a move already done is skipped), then
    drop the journal and the staging folders it names. With `check` (a journal of a dead
    writer), a stale journal (stale_moves) is discarded instead."""
    base = journal.parent
    stale = stale_moves(journal) if check else []
    if stale:
        return _discard(journal, stale)
    entry = json.loads(journal.read_text())
    moved = 0
    for src, dst in entry["moves"]:
        if src is None:
            (base / dst).unlink(missing_ok=True)
        elif (base / src).exists():
            os.replace(base / src, base / dst)
            moved += 1
            if moved == 1:
                _pause("installing")
    journal.unlink()
    for folder in entry["staging"]:  # normalised first: "a/.install-x/../../b/.install-x" needs a/.install-x
        shutil.rmtree(os.path.normpath(base / folder), ignore_errors=True)


@contextmanager
def writer_lock(folders, wait_s: float = LOCK_WAIT_S):
    """Hold the writer lock of each folder (created if needed), taken in sorted order so that
    writers of overlapping folders cannot deadlock. Waits up to `wait_s`, then CovidXrayError."""
    from filelock import FileLock, Timeout

    from covidxray import CovidXrayError

    held = []
    try:
        for folder in sorted({Path(f).resolve() for f in folders}):
            folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(folder / WRITER_LOCK, timeout=wait_s)
            try:
                lock.acquire()
            except Timeout:
                raise CovidXrayError(
                    f"another process has been installing into {folder} for {wait_s:.0f}s "
                    f"(lock {folder / WRITER_LOCK}); try again when it is done"
                ) from None
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def finish_pending(folder: Path) -> None:
    """Complete any install into `folder` whose writer committed (wrote its journal) and then
    died or is finishing now; uncommitted staging folders are left to their writer. Takes the
    writer lock only when there is a journal (a reader of a read-only folder never writes)."""
    if not any((staging / JOURNAL).is_file() for staging in Path(folder).glob(PREFIX + "*")):
        return
    with writer_lock([folder]):
        _finish_pending(folder)


def _finish_pending(folder: Path) -> None:
    """finish_pending, the writer lock held."""
    for staging in sorted(Path(folder).glob(PREFIX + "*")):
        if not (staging / JOURNAL).is_file():
            continue
        owner = _lock(staging / OWNER, blocking=True)  # a live writer finishes in milliseconds
        if owner is None:
            continue
        try:
            if (staging / JOURNAL).is_file():
                _apply(staging / JOURNAL, check=True)
        finally:
            owner.close()


def recover(folders) -> None:
    """What a writer runs first: finish committed installs, then remove the staging folders
    of writers that died before committing."""
    folders = [Path(f) for f in folders]
    with writer_lock(folders):
        _recover(folders)


def _recover(folders: list[Path]) -> None:
    """recover, the writer lock held."""
    for folder in folders:
        _finish_pending(folder)
    for folder in folders:
        for staging in sorted([*folder.glob(f"{PREFIX}*"), *folder.glob(f".draft{PREFIX}*")]):
            owner = _lock(staging / OWNER, blocking=False)
            if owner is not None:
                shutil.rmtree(staging, ignore_errors=True)
                owner.close()


def recover_under(root: Path, depth: int = 6) -> list[Path]:
    """Start-up clean-up of a tree of run folders (Hydra's outputs/, multirun/), whose folders
    no later writer revisits: `recover` each folder up to `depth` levels down that holds staging
    folders (committed installs finished, dead writers' drafts removed, live ones left alone).
    Returns those folders."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = set()
    for level in range(1, depth + 1):
        for pattern in (f"{PREFIX}*", f".draft{PREFIX}*"):
            found |= {p.parent for p in root.glob("/".join(["*"] * (level - 1) + [pattern]))}
    for folder in sorted(found):
        recover([folder])
    return sorted(found)


@contextmanager
def install_together(folders, remove=()):
    """Staging folders, one per destination folder (created if needed). When the block ends
    without error, every file written into a staging folder replaces its namesake in the
    destination, and each path in `remove` is deleted, all together; on an error nothing changes."""
    folders = [Path(f) for f in folders]
    token = f"{os.getpid()}-{time.time_ns()}"
    staging, owners = [], []
    try:
        with writer_lock(folders):  # no other writer's `recover` sees a draft before its owner lock
            _recover(folders)
            for folder in folders:
                draft = Path(tempfile.mkdtemp(prefix=f".draft{PREFIX}", dir=folder))
                owners.append(_lock(draft / OWNER, blocking=False))
                staging.append(draft.rename(folder / f"{PREFIX}{token}"))
        with naming_writes(folders[0], "the outputs installed together (" + ", ".join(map(str, folders)) + ")"):
            yield staging
        with writer_lock(folders):  # one install at a time, after any a dead writer committed
            for folder in folders:
                _finish_pending(folder)
            _commit(staging, folders, [Path(p) for p in remove])
    finally:
        for path in staging:
            shutil.rmtree(path, ignore_errors=True)
        for owner in owners:
            if owner is not None:
                owner.close()


def _commit(staging: list[Path], folders: list[Path], remove: list[Path]) -> None:
    """Write the journal of moves (the commit point), then carry it out."""
    base = staging[0]
    moves = []
    for path, folder in zip(staging, folders):
        for item in sorted(p for p in path.iterdir() if p.name != OWNER):
            moves.append([os.path.relpath(item, base), os.path.relpath(folder / item.name, base)])
    moves += [[None, os.path.relpath(p, base)] for p in remove]
    for path in staging:
        _sync(path)
    _pause("staged")
    digests = {src: _digest(base / src) for src, _ in moves if src is not None and (base / src).is_file()}
    entry = {"moves": moves, "staging": [os.path.relpath(p, base) for p in staging], "sha256": digests}
    draft = base / (JOURNAL + ".draft")
    with open(draft, "w") as handle:
        handle.write(json.dumps(entry, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(draft, base / JOURNAL)
    _pause("committed")
    _apply(base / JOURNAL)
