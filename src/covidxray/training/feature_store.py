"""The feature store: a frozen backbone's output for each image, computed once per key and kept on disk.

A key names everything that changes the backbone's output apart from the pixels: the model's
backbone, a digest of its weights, its in-model preprocessing, the input shape, the feature source
(model.features: last | blocks) and the engine that
ran it (extraction.py builds it). Images are addressed by content: an image's id is a digest of
its model-input pixels (after resize, border crop and normalisation), so a different crop,
normalisation, resize or curation gives other ids and can never hit a stale entry.

Layout, under the store's root (default data/features, `paths.features`; a cache, git-ignored):

    <key digest>/key.json                the key, in words
    <key digest>/part-<ids digest>/      one part per batch of images computed together:
        features.npy, ids.npy            float32 (n, ...) and the image ids
        manifest.json                    the key digest, shapes, sha256 and size of both files
    <key digest>/<name>                  artifacts of the key (the converted TFLite backbone), with
    <key digest>/<name>.json             its sha256

Parts and artifacts are written into a temporary folder or file and renamed into place, so a
reader sees whole entries only, also after a kill or a full disk. A part or artifact whose
manifest is unreadable, whose key is another's, or whose files are truncated or fail their
checksum is reported in one line naming it, removed, and recomputed: never used.
No TensorFlow here: the caller passes the function that computes features.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.infra.outputs import clean_leftovers, scratch_dir

KEY_FILE = "key.json"
MANIFEST = "manifest.json"
ARRAYS = ("features.npy", "ids.npy")
SCRATCH_TAG = "tmp"  # a part being written: .tmp-<pid>-*/work, with the writer's host and pid (infra.outputs)


def row_ids(images: np.ndarray) -> np.ndarray:
    """Content ids of images (N, ...): blake2b-128 of each image's shape, dtype and bytes (hex)."""
    images = np.ascontiguousarray(images)
    head = f"{images.dtype.str}{images.shape[1:]}".encode()
    return np.array([hashlib.blake2b(head + row.tobytes(), digest_size=16).hexdigest() for row in images], dtype="U32")


def key_digest(key: dict) -> str:
    """The store's name for a key: sha256 of its canonical JSON, 24 hex digits."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class BadEntry(Exception):
    """A part or artifact of the store that must not be used (the message says why)."""


@dataclass
class Lookup:
    """What one lookup found: hits (images read from the store), misses (computed now)."""

    hits: int = 0
    misses: int = 0
    seconds: float = 0.0  # spent computing the misses


@dataclass
class FeatureStore:
    """Features by (key, image content) under root; root None keeps nothing on disk (every image
    is a miss, computed once per lookup). Counts hits and misses over its lifetime."""

    root: Path | None
    log: Callable[[str], None] = print
    hits: int = 0
    misses: int = 0
    compute_seconds: float = 0.0
    keys: list = field(default_factory=list)  # digests looked up, in order

    def __post_init__(self):
        self.root = None if self.root is None else Path(self.root)

    def lookup(self, key: dict, images: np.ndarray, compute: Callable[[np.ndarray], np.ndarray], label: str = ""):
        """Features of every image (rows of `images`), reading stored ones and computing the rest
        with compute(images subset) -> float32 (n, ...), which are then stored as one new part."""
        digest = key_digest(key)
        ids = row_ids(images)
        unique, first = np.unique(ids, return_index=True)
        found = self._read(digest, key, set(unique.tolist()))
        missing = np.array([i for i, name in zip(first, unique, strict=True) if name not in found], dtype=int)
        result = Lookup(hits=len(unique) - len(missing), misses=len(missing))
        if len(missing):
            start = time.perf_counter()
            computed = np.asarray(compute(images[missing]), dtype=np.float32)
            result.seconds = time.perf_counter() - start
            found.update(zip(ids[missing].tolist(), computed, strict=True))
            self._write(digest, key, ids[missing], computed)
        self._count(digest, key, result, len(images), label)
        return np.stack([found[i] for i in ids.tolist()]) if len(ids) else np.zeros((0,), np.float32)

    def _count(self, digest: str, key: dict, result: Lookup, n: int, label: str) -> None:
        self.hits, self.misses = self.hits + result.hits, self.misses + result.misses
        self.compute_seconds += result.seconds
        self.keys.append(digest)
        rate = f", computed in {result.seconds:.1f}s ({result.misses / max(result.seconds, 1e-9):.0f} images/s)"
        where = "memory only" if self.root is None else str(self.root / digest)
        pooled = ", pooled {}x{}".format(*key["head_pool"]) if key.get("head_pool") else ""
        self.log(
            f"features{f' ({label})' if label else ''}: {key.get('model', '?')} [{key.get('engine', '?')}{pooled}] "
            f"{n} images: {result.hits} hits, {result.misses} misses{rate if result.misses else ''}; {where}"
        )

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, digest: str, key: dict, wanted: set[str]) -> dict[str, np.ndarray]:
        """Stored features of the wanted ids: {id: features}. Bad parts are reported and removed."""
        if self.root is None or not (self.root / digest).is_dir():
            return {}
        found: dict[str, np.ndarray] = {}
        for part in sorted((self.root / digest).glob("part-*")):
            if not wanted - found.keys():
                break
            try:
                ids, features = read_part(part, digest)
            except BadEntry as err:
                self.log(f"features: {err}: removed, its images are recomputed")
                shutil.rmtree(part, ignore_errors=True)
                continue
            rows = [r for r, i in enumerate(ids.tolist()) if i in wanted and i not in found]
            if rows:
                found.update(zip(ids[rows].tolist(), np.asarray(features[rows]), strict=True))
        return found

    # -- writing ---------------------------------------------------------------------------------

    def _write(self, digest: str, key: dict, ids: np.ndarray, features: np.ndarray) -> None:
        """One new part, written in a temporary folder and renamed into place. Any OSError (a full
        disk, no permission) is one line naming the file: the features serve this run, nothing
        half-written stays."""
        if self.root is None:
            return
        entry = self.root / digest
        name = "part-" + hashlib.sha256("".join(sorted(ids.tolist())).encode()).hexdigest()[:16]
        target = entry / "features.npy"
        try:
            entry.mkdir(parents=True, exist_ok=True)
            if not (entry / KEY_FILE).is_file():
                atomic_write_bytes(entry / KEY_FILE, (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())
            with scratch_dir(entry, SCRATCH_TAG) as tmp:  # marked: a later run removes it if this one is killed
                files = {}
                for fname, array in zip(ARRAYS, (features, ids), strict=True):
                    target = tmp / fname
                    np.save(target, array)
                    files[fname] = {"sha256": file_sha256(target), "bytes": target.stat().st_size}
                target = tmp / MANIFEST
                manifest = {"key": digest, "rows": int(len(ids)), "shape": list(features.shape[1:]), "files": files}
                target.write_text(json.dumps(manifest, indent=2) + "\n")
                try:
                    os.rename(tmp, entry / name)
                except OSError:
                    if not (entry / name).is_dir():  # not a twin written by a parallel run
                        raise
        except OSError as err:
            self.log(f"features: not stored: cannot write {target} ({err.strerror or err}); used for this run only")

    # -- artifacts of a key (the converted backbone) ---------------------------------------------

    def artifact(self, key: dict, name: str, make: Callable[[], bytes]) -> bytes:
        """The bytes of a file kept with the key's entry (checked against its sha256), made by
        make() and stored when absent or bad."""
        if self.root is not None:
            path = self.root / key_digest(key) / name
            try:
                return read_artifact(path)
            except FileNotFoundError:
                pass
            except BadEntry as err:
                self.log(f"features: {err}: removed, made again")
                for stale in (path, path.with_name(name + ".json")):
                    stale.unlink(missing_ok=True)
        data = make()
        if self.root is not None:
            path = self.root / key_digest(key) / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
                sidecar = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                atomic_write_bytes(path.with_name(name + ".json"), json.dumps(sidecar).encode())
            except OSError as err:
                self.log(f"features: not stored: cannot write {path} ({err.strerror or err})")
        return data


def read_part(part: Path, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of a part, checked against its manifest; BadEntry naming the file otherwise."""
    path = part / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files, key = manifest["files"], manifest["key"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadEntry(f"{path}: unreadable manifest ({type(err).__name__})") from None
    if key != digest:
        raise BadEntry(f"{path}: key {key} is not the entry's ({digest}), a foreign or stale part")
    for fname in ARRAYS:
        path = part / fname
        expected = files.get(fname) or {}
        size = path.stat().st_size if path.is_file() else None
        if size != expected.get("bytes"):
            raise BadEntry(f"{path}: {size} bytes, the manifest says {expected.get('bytes')} (truncated or missing)")
        if file_sha256(path) != expected.get("sha256"):
            raise BadEntry(f"{path}: checksum mismatch (corrupt)")
    try:
        ids, features = np.load(part / "ids.npy"), np.load(part / "features.npy", mmap_mode="r")
    except (OSError, ValueError) as err:
        raise BadEntry(f"{part / 'features.npy'}: unreadable ({err})") from None
    if len(ids) != len(features) or len(ids) != manifest.get("rows"):
        raise BadEntry(f"{part / MANIFEST}: row counts disagree")
    return ids, features


def read_artifact(path: Path) -> bytes:
    """An artifact's bytes, checked against its sidecar; FileNotFoundError when absent."""
    data = path.read_bytes()
    try:
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    except (OSError, ValueError) as err:
        raise BadEntry(f"{path}: no readable checksum beside it ({type(err).__name__})") from None
    if len(data) != sidecar.get("bytes") or hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
        raise BadEntry(f"{path}: checksum mismatch (truncated or corrupt)")
    return data


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write path through a temporary file beside it and a rename; no partial file on failure."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_store(root, log: Callable[[str], None] = print) -> FeatureStore:
    """The store at root (a path, or None/"" for memory only); a root that is a file is a one-line error."""
    if root in (None, ""):
        return FeatureStore(None, log)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CovidXrayError(f"paths.features: {root} is a file, not a folder for the feature store")
    if root.is_dir():  # parts a killed run was writing (hundreds of MB): its marked scratch folders
        for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            clean_leftovers(entry, SCRATCH_TAG)
    return FeatureStore(root, log)
