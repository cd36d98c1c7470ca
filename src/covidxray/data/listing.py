"""Listing a collection's images by its definition: one record per image (label, patient, file,
finding, view, sex, age), before any image is decoded.

Every problem of the inputs (a missing folder or table, a label that maps to no class, a table
without a needed column, a path outside the collection's folder, a file name without a patient, a
folder without images) is a one-line CovidXrayError naming the collection, the file and the key of
its definition, so curate stops before decoding anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data.audit import UNKNOWN
from covidxray.data.collections import TASKS, Collection

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
RECORD_COLUMNS = ["label", "patient_id", "source", "file", "finding", "view", "sex", "age", "rel"]
OPTIONAL_ROLES = ("view", "sex", "age", "modality")


def _fail(c: Collection, what: str, key: str) -> None:
    raise CovidXrayError(f"collection {c.name}: {what} (key {c.where}.{key})")


def _sex(value) -> str:
    value = str(value).strip().upper() if isinstance(value, str) else ""
    return value if value in ("M", "F") else UNKNOWN


def _inside(root: Path, relative: str) -> Path | None:
    """root/relative, normalised without following links; None where it leaves root."""
    path = Path(os.path.normpath(Path(root) / relative))
    base = Path(os.path.normpath(root))
    return path if path == base or base in path.parents else None


def _check_links(c: Collection, root: Path, files: list[Path], key: str) -> None:
    """Each file must resolve (following symbolic links, of the file or a folder above it)
    inside root: a link out of the collection's folder is a one-line error, as a path is."""
    base = Path(root).resolve()
    for f in files:
        target = Path(f).resolve()
        if target != base and base not in target.parents:
            _fail(c, f"{f} leads through a symbolic link to {target}, outside {root}", key)


def _patients(c: Collection, files: list[Path], column: list | None) -> list[str]:
    """`name-<patient>` per file: from a column, a file-name pattern, or the file itself (none)."""
    how, arg = c.patient
    if how == "column" or (how == "auto" and column is not None):
        stems = [f.stem for f in files]
        return [f"{c.name}-{p if str(p).strip() else s}" for p, s in zip(column, stems)]
    if how == "pattern":
        out = []
        for f in files:
            match = next((m for m in (re.search(p, f.name) for p in arg) if m), None)
            group = next((g for g in (match.groups() if match else ()) if g), None)
            if group is None:
                _fail(c, f"cannot tell the patient of {f} (no pattern matches its name: {', '.join(arg)})", "patient")
            out.append(f"{c.name}-{group}")
        return out
    return [f"{c.name}-{f.stem}" for f in files]


def _frame(c: Collection, files, rel, labels, findings, patients, view=None, sex=None, age=None) -> pd.DataFrame:
    n = len(files)
    return pd.DataFrame(
        {
            "label": list(labels),
            "patient_id": list(patients),
            "source": [c.name] * n,
            "file": [Path(f).as_posix() for f in files],
            "finding": list(findings),
            "view": [UNKNOWN] * n if view is None else [str(v) for v in view],
            "sex": [UNKNOWN] * n if sex is None else [_sex(s) for s in sex],
            "age": np.full(n, np.nan)
            if age is None
            else pd.to_numeric(pd.Series(list(age)), errors="coerce").to_numpy(float),
            "rel": list(rel),
        },
        columns=RECORD_COLUMNS,
    )


def _classify(c: Collection, labels, where: str) -> tuple[list, list]:
    """Class (or None) and finding per label; a label nothing maps is an error unless the
    definition leaves such labels out."""
    classes, findings = [], []
    for label in labels:
        cls, finding, known = c.classify(str(label))
        if not known and c.other_labels == "error":
            mapped = ", ".join(label for label, _, _ in c.labels) or "none"
            _fail(c, f"{where}: label {str(label)!r} maps to no class (mapped labels: {mapped})", "labels")
        classes.append(cls)
        findings.append(finding if known else str(label))
    return classes, findings


def list_folder(c: Collection, external: Path, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A folder with one sub-folder per label; images of a class the task lacks are left out."""
    root = Path(external) / c.path
    if not root.is_dir():
        _fail(c, f"folder missing: {root} (put the images there, e.g. `dvc pull data.dvc`)", "path")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, findings = _classify(c, [s.name for s in subs], str(root))
    frames, total = [], 0
    for sub, cls, finding in zip(subs, classes, findings):
        files = [
            f
            for f in sorted(sub.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        ]
        _check_links(c, root, files, "path")
        total += len(files)
        if cls not in TASKS[task] or not files:
            continue
        rel = [f.relative_to(root).as_posix() for f in files]
        frames.append(_frame(c, files, rel, [cls] * len(files), [finding] * len(files), _patients(c, files, None)))
    if total == 0:
        _fail(c, f"no images in {root} (expected {root}/<label>/<image>, {', '.join(IMAGE_SUFFIXES)})", "path")
    return _concat(frames), _concat([])


def _read_table(c: Collection, path: Path) -> pd.DataFrame:
    if not path.is_file():
        hint = " (run `dvc repro fetch`)" if c.kind == "fetch" else ""
        _fail(c, f"file missing: {path}{hint}", "path")
    try:
        if c.kind == "fetch":
            return pd.read_csv(path, dtype=str)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        _fail(c, f"{path}: not a readable CSV ({' '.join(str(err).split())[:200]})", "path")


def _roles(c: Collection, table: pd.DataFrame, path: Path) -> dict:
    """Role -> column name(s) of the table; a needed column that is absent is an error."""
    roles = dict(c.columns)
    if c.kind == "csv":
        roles.update({r: r for r in OPTIONAL_ROLES if r not in roles and r in table.columns})
    needed = {"path": roles.get("path"), "label": roles.get("label")}
    if c.patient[0] == "column":
        needed["patient"] = c.patient[1]
    elif c.patient[0] == "auto" and "patient_id" in table.columns:
        needed["patient"] = "patient_id"
    if c.filter("views"):
        needed["view"] = roles.get("view")
    if c.filter("modality"):
        needed["modality"] = roles.get("modality")
    if c.filter("min_age") is not None or c.filter("max_age") is not None or c.probe_min_age:
        needed["age"] = roles.get("age")
    needed.update({r: roles[r] for r in OPTIONAL_ROLES if roles.get(r) and r not in needed})
    for role, col in needed.items():
        cols = [col] if isinstance(col, str) else list(col or [])
        absent = [k for k in cols if k not in table.columns] or ([] if cols else [f"<{role}>"])
        if absent:
            key = "patient.column" if role == "patient" else f"columns.{role}"
            _fail(c, f"{path} lacks column(s) {', '.join(absent)} for {role}", key)
    return {**roles, **needed}


def _keep(c: Collection, table: pd.DataFrame, roles: dict) -> np.ndarray:
    """The rows that pass the definition's filters (views, modality, ages; unknown ages pass)."""
    keep = np.ones(len(table), dtype=bool)
    if c.filter("views"):
        keep &= table[roles["view"]].isin(list(c.filter("views"))).to_numpy()
    if c.filter("modality"):
        keep &= table[roles["modality"]].isin(list(c.filter("modality"))).to_numpy()
    if "age" in roles and roles["age"]:
        age = pd.to_numeric(table[roles["age"]], errors="coerce")
        if c.filter("min_age") is not None:
            keep &= ~(age < c.filter("min_age")).to_numpy()
        if c.filter("max_age") is not None:
            keep &= ~(age > c.filter("max_age")).to_numpy()
    return keep


def list_table(c: Collection, raw: Path, external: Path, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A table (fetch: the metadata of data/raw; csv: validate's CSV) with one row per image:
    (class records, probe records: its rows of no class of the task, for a definition with a probe)."""
    path = Path(raw if c.kind == "fetch" else external) / c.path
    table = _read_table(c, path)
    roles = _roles(c, table, path)
    if table.empty:
        _fail(c, f"{path} lists no images", "path")
    table = table[_keep(c, table, roles)]  # keeps the table's row numbers for the messages
    root = path.parent
    parts = [roles["path"]] if isinstance(roles["path"], str) else list(roles["path"])
    joined = ["/".join(str(v) for v in row) for row in table[parts].itertuples(index=False)]
    files = []
    for k, rel in zip(table.index, joined):
        inside = _inside(root, rel)
        if inside is None:
            _fail(c, f"{path} row {k + 2}: path {rel!r} is outside {root}", f"columns.path ({'/'.join(parts)})")
        if c.kind == "csv" and not inside.is_file():
            _fail(c, f"{path} row {k + 2}: image missing: {inside}", f"columns.path ({'/'.join(parts)})")
        files.append(inside)
    _check_links(c, root, files, f"columns.path ({'/'.join(parts)})")
    classes, findings = _classify(c, table[roles["label"]].astype(str).tolist(), str(path))
    patient_col = roles.get("patient")
    patients = _patients(c, files, None if patient_col is None else table[patient_col].astype(str).tolist())
    rel = [Path(os.path.relpath(f, root)).as_posix() for f in files]
    extra = {k: (None if not roles.get(k) else table[roles[k]]) for k in ("view", "sex", "age")}
    frame = _frame(c, files, rel, [x or "" for x in classes], findings, patients, **extra)
    in_task = np.array([x in TASKS[task] for x in classes], dtype=bool)
    records = frame[in_task].reset_index(drop=True)
    if c.probe_min_age is None:
        return records, _concat([])
    probe = frame[~in_task & ~(frame["age"] < c.probe_min_age).to_numpy()].assign(label="other")
    return records, probe.reset_index(drop=True)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The non-empty frames, one after the other (empty ones would turn every column to object)."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RECORD_COLUMNS)


def list_collections(collections, raw: Path, external: Path, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(class records, probe records) of every collection, in the order given; an empty collection
    (no image of the task's classes) is an error."""
    records, probes = [], []
    for c in collections:
        found, probe = list_folder(c, external, task) if c.kind == "folder" else list_table(c, raw, external, task)
        if found.empty:
            _fail(c, f"no images of the classes of task {task} ({', '.join(TASKS[task])})", "labels")
        records.append(found)
        probes.append(probe)
    return _concat(records), _concat(probes)
