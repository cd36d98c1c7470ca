"""Downloading a collection verified against a sha256 manifest: the manifest's format (read and
written), the sources files come from (a local mirror or HTTP), transfers with retries, and a
verified copy swapped into place whole (fetch_dataset).

The manifest (`sha256sum` format, with a `#` header naming repo, commit and views) is the data
version: every file of data/raw is listed with its sha256, so `cd data/raw && sha256sum -c MANIFEST`
checks a copy by hand. Files come from `{base_url}/{repo}/{commit}/{path}`, or from a local mirror
with the same layout below it (`$COVIDXRAY_DATA_MIRROR`, else `../shared/datasets` if present).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple
from urllib.parse import urlsplit

from tqdm import tqdm

from covidxray import CovidXrayError
from covidxray.infra.outputs import replace_dir

MIRROR_ENV = "COVIDXRAY_DATA_MIRROR"
DEFAULT_MIRROR = Path("..") / "shared" / "datasets"
DEFAULT_REPO = "ieee8023/covid-chestxray-dataset"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
DEFAULT_MANIFEST = "manifests/covid-chestxray-dataset.sha256"
METADATA = "metadata.csv"
CHUNK = 1 << 20

_ENTRY_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_META_LINE = re.compile(r"^#\s*(repo|commit|views|unavailable):\s*(.*?)\s*$")


class Entry(NamedTuple):
    """One manifest line: a path relative to data/raw and the sha256 its bytes must have."""

    path: str
    sha256: str


@dataclass(frozen=True)
class FetchStats:
    """What a fetch did: files reused from the previous data/raw, files and bytes transferred."""

    reused: int
    fetched: int
    bytes_fetched: int


class Missing(Exception):
    """The source has no such file (HTTP 404, absent from the mirror)."""


class _Transient(Exception):
    """A failure worth retrying (connection reset, timeout, HTTP 5xx/429)."""


# ---------------------------------------------------------------------------------------------
# Paths from data


def safe_relpath(relpath: str, origin: str = "") -> str:
    """`relpath` if it is a plain relative POSIX path that stays below its root; else an error.

    File names come from data (metadata.csv, the manifest), so `..`, absolute paths, drive letters,
    backslashes, colons and control characters are refused before anything is read or written.
    """
    where = f" (in {origin})" if origin else ""
    parts = relpath.split("/")
    if (
        not relpath
        or any(ord(c) < 32 for c in relpath)
        or "\\" in relpath
        or ":" in relpath
        or PurePosixPath(relpath).is_absolute()
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise CovidXrayError(f"unsafe file name {relpath!r}{where}: not a plain relative path inside the data folder")
    return relpath


def _inside(root: Path, relpath: str) -> Path:
    """root/relpath, checked once more after resolving links that it stays inside root."""
    path = root / safe_relpath(relpath)
    if not path.resolve().is_relative_to(root.resolve()):
        raise CovidXrayError(f"unsafe file name {relpath!r}: {path} resolves outside {root}")
    return path


# ---------------------------------------------------------------------------------------------
# The manifest


def read_manifest(path: Path) -> tuple[dict, list[Entry]]:
    """Parse a manifest: header values (repo, commit, views, unavailable) and its entries."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CovidXrayError(f"manifest not found: {path}") from None
    meta: dict = {"unavailable": []}
    entries: list[Entry] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            match = _META_LINE.match(line)
            if match and match[1] == "unavailable":
                meta["unavailable"].append(match[2])
            elif match and match[1] == "views":
                meta["views"] = [v.strip() for v in match[2].split(",") if v.strip()]
            elif match:
                meta[match[1]] = match[2]
            continue
        match = _ENTRY_LINE.match(line)
        if not match:
            raise CovidXrayError(f"{path}:{number}: not a '<sha256>  <path>' line: {line[:80]!r}")
        relpath = safe_relpath(match[2], f"{path}:{number}")
        if relpath in seen:
            raise CovidXrayError(f"{path}:{number}: {relpath} is listed twice")
        seen.add(relpath)
        entries.append(Entry(relpath, match[1].lower()))
    if not entries:
        raise CovidXrayError(f"manifest {path} lists no files")
    return meta, entries


def check_manifest(meta: dict, path: Path, repo: str, commit: str) -> None:
    """Refuse a manifest written for another repository or commit than the configured one."""
    for key, want in (("repo", repo), ("commit", commit)):
        have = meta.get(key)
        if have != want:
            raise CovidXrayError(
                f"manifest {path} is for {key} {have or '(none)'}, but fetch.{key} is {want}; "
                f"regenerate it with `covidxray manifest --repo {repo} --commit {commit}`"
            )


def write_manifest(
    path: Path,
    entries: Iterable[Entry],
    repo: str,
    commit: str,
    views: Iterable[str],
    unavailable: Iterable[str] = (),
) -> None:
    """Write a `sha256sum -c`-compatible manifest with a `#` header naming repo and commit."""
    entries, unavailable, views = list(entries), list(unavailable), list(views)
    header = [
        f"# sha256 manifest of {repo} at {commit}: the data version of the fetch stage (data/raw).",
        "# Check a copy:  cd data/raw && sha256sum -c ../../manifests/covid-chestxray-dataset.sha256",
        f"# Regenerate:   covidxray manifest --repo {repo} --commit SHA --views {' '.join(views)}",
        f"# repo: {repo}",
        f"# commit: {commit}",
        f"# views: {', '.join(views)}",
        f"# selection: metadata.csv rows with modality == X-ray and view in ({', '.join(views)})",
        f"# files: {len(entries)}",
    ]
    if unavailable:
        header.append(f"# {len(unavailable)} selected files were unavailable at the source, so not listed:")
        header += [f"# unavailable: {relpath}" for relpath in unavailable]
    body = [f"{entry.sha256}  {safe_relpath(entry.path)}" for entry in entries]
    path = Path(path)
    text = "\n".join(header + body) + "\n"
    replace_dir(
        path.parent, lambda new: (new / path.name).write_text(text, encoding="utf-8"), by="manifest", names=[path.name]
    )


# ---------------------------------------------------------------------------------------------
# Sources


class MirrorSource:
    """A local directory holding the collection's files at their repository paths."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def where(self, relpath: str) -> str:
        return str(self.root / relpath)

    def chunks(self, relpath: str, timeout: float) -> Iterator[bytes]:
        """The file's bytes; a symlink anywhere below the mirror root is refused."""
        path = self.root
        for part in PurePosixPath(safe_relpath(relpath)).parts:
            path = path / part
            if path.is_symlink():
                raise CovidXrayError(f"{relpath}: {path} is a symlink in the mirror; refusing it")
        if not path.is_file():
            raise Missing
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


class HttpSource:
    """Files under a URL prefix (`{base_url}/{repo}/{commit}`), downloaded with requests."""

    def __init__(self, prefix: str):
        import requests

        self.prefix = prefix.rstrip("/")
        self.session = requests.Session()

    def where(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}"

    def chunks(self, relpath: str, timeout: float) -> Iterator[bytes]:
        """The file's bytes; 404 means missing, connection trouble and 5xx/429 are transient."""
        import requests

        url = self.where(safe_relpath(relpath))
        try:
            with self.session.get(url, stream=True, timeout=timeout) as response:
                status = response.status_code
                if status == 404:
                    raise Missing
                if status == 429 or status >= 500:
                    raise _Transient(f"HTTP {status}")
                if status != 200:
                    raise CovidXrayError(f"{relpath}: HTTP {status} from {url}")
                yield from response.iter_content(CHUNK)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err


def find_mirror(root: Path, env: Mapping[str, str]) -> Path | None:
    """The mirror to read instead of the network: $COVIDXRAY_DATA_MIRROR (empty: none), else
    ../shared/datasets beside the repository root if it exists, else None."""
    value = env.get(MIRROR_ENV)
    if value is not None:
        if not value:
            return None
        if not Path(value).is_dir():
            raise CovidXrayError(f"{MIRROR_ENV}={value} is not a directory")
        return Path(os.path.abspath(value))
    default = Path(os.path.abspath(Path(root) / DEFAULT_MIRROR))
    return default if default.is_dir() else None


def resolve_source(base_url: str, repo: str, commit: str, mirror: Path | None) -> MirrorSource | HttpSource:
    """Where `{base_url}/{repo}/{commit}/...` is read from: the mirror's copy of that URL path if a
    mirror is given (mirror/raw.githubusercontent.com/REPO/COMMIT/...), else the URL itself."""
    prefix = f"{base_url.rstrip('/')}/{repo}/{commit}"
    if mirror is None:
        return HttpSource(prefix)
    url = urlsplit(prefix)
    rel = f"{url.netloc}{url.path}"
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise CovidXrayError(f"cannot map {prefix} into the mirror {mirror}")
    return MirrorSource(Path(mirror) / rel)


# ---------------------------------------------------------------------------------------------
# Transfers


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def transfer(
    source,
    relpath: str,
    sink: BinaryIO | None,
    retries: int,
    timeout: float,
    backoff_s: float,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> str:
    """Copy one file from `source` into `sink` (or just hash it), retrying transient failures with
    exponential backoff; returns the sha256 of what arrived. Raises Missing for an absent file."""
    for attempt in range(retries + 1):
        digest = hashlib.sha256()
        if sink is not None:
            sink.seek(0)
            sink.truncate()
        try:
            for chunk in source.chunks(relpath, timeout):
                digest.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                on_bytes(len(chunk))
            return digest.hexdigest()
        except _Transient as err:
            if attempt == retries:
                raise CovidXrayError(
                    f"{relpath}: could not fetch {source.where(relpath)} after {retries + 1} attempts ({err})"
                ) from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _reuse(entry: Entry, old_root: Path, target: Path) -> bool:
    """Link (or copy) `entry` from a previous data/raw into `target` if it is there and verifies."""
    try:
        old = _inside(old_root, entry.path)
    except CovidXrayError:
        return False
    if old.is_symlink() or not old.is_file() or sha256_file(old) != entry.sha256:
        return False
    try:
        os.link(old, target)
    except OSError:
        shutil.copy2(old, target)
    return True


def fetch_files(
    entries: list[Entry],
    source,
    dest: Path,
    retries: int,
    timeout: float,
    reuse_from: Path | None = None,
    backoff_s: float = 1.0,
) -> FetchStats:
    """Put every manifest entry into `dest`, verified by sha256: reused from `reuse_from` (a
    previous copy) when it verifies there, else read from `source`. Any mismatch is an error."""
    dest = Path(dest)
    reused = fetched = nbytes = 0
    with tqdm(total=len(entries), unit="file", desc="fetch", disable=None, file=sys.stderr) as bar:

        def on_bytes(n: int) -> None:
            nonlocal nbytes
            nbytes += n
            bar.set_postfix_str(mib(nbytes), refresh=False)
            bar.update(0)

        for entry in entries:
            target = _inside(dest, entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if reuse_from is not None and _reuse(entry, Path(reuse_from), target):
                reused += 1
            else:
                try:
                    with open(target, "wb") as sink:
                        digest = transfer(source, entry.path, sink, retries, timeout, backoff_s, on_bytes)
                except Missing:
                    raise CovidXrayError(f"{entry.path}: not found at {source.where(entry.path)}") from None
                if digest != entry.sha256:
                    raise CovidXrayError(
                        f"{entry.path}: checksum mismatch for {source.where(entry.path)}: "
                        f"expected sha256 {entry.sha256}, got {digest}"
                    )
                fetched += 1
            bar.update(1)
    return FetchStats(reused=reused, fetched=fetched, bytes_fetched=nbytes)


def fetch_dataset(
    entries: list[Entry],
    source,
    raw_dir: Path,
    retries: int,
    timeout: float,
    backoff_s: float = 1.0,
) -> FetchStats:
    """Build a verified copy in a scratch folder beside `raw_dir` (reusing verified files from the
    current `raw_dir`), then swap it into place: a failed run leaves `raw_dir` as it was, and a
    killed run's scratch folder is removed by the next run."""
    raw_dir = Path(raw_dir)
    previous = raw_dir if raw_dir.is_dir() and not raw_dir.is_symlink() else None
    return replace_dir(
        raw_dir,
        lambda new: fetch_files(entries, source, new, retries, timeout, reuse_from=previous, backoff_s=backoff_s),
        by="fetch",
    )
