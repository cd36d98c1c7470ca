"""`covidxray manifest --commit SHA`: write the sha256 manifest of a commit of the collection
(metadata.csv and the images of its X-ray rows in the chosen views), hashing the files straight
from the mirror or the network. The manifest is the fetch stage's data version.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from covidxray import CovidXrayError
from covidxray.data.download import (
    DEFAULT_BASE_URL,
    DEFAULT_MANIFEST,
    DEFAULT_MIRROR,
    DEFAULT_REPO,
    METADATA,
    MIRROR_ENV,
    Entry,
    Missing,
    find_mirror,
    resolve_source,
    safe_relpath,
    transfer,
    write_manifest,
)


def select_images(metadata: bytes, views: Iterable[str], origin: str = METADATA) -> list[str]:
    """Repository paths (folder/filename) of the metadata rows with modality X-ray and a view in `views`."""
    views = set(views)
    try:
        rows = list(csv.DictReader(io.StringIO(metadata.decode("utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as err:
        raise CovidXrayError(f"{origin}: cannot read it as CSV ({err})") from None
    needed = {"modality", "view", "folder", "filename"}
    if not rows or not needed <= set(rows[0]):
        raise CovidXrayError(f"{origin}: expected columns {', '.join(sorted(needed))}")
    paths = {
        safe_relpath(f"{row['folder']}/{row['filename']}" if row["folder"] else row["filename"], origin)
        for row in rows
        if row["modality"] == "X-ray" and row["view"] in views
    }
    return sorted(paths)


def build_manifest(
    source, views: Iterable[str], retries: int, timeout: float, backoff_s: float = 1.0
) -> tuple[list[Entry], list[str]]:
    """Hash metadata.csv and the images it selects, straight from `source`: (entries, unavailable).
    Selected files that the source does not have are returned as unavailable, with a warning."""
    buffer = io.BytesIO()
    try:
        meta_sha = transfer(source, METADATA, buffer, retries, timeout, backoff_s)
    except Missing:
        raise CovidXrayError(f"{METADATA}: not found at {source.where(METADATA)}") from None
    entries = [Entry(METADATA, meta_sha)]
    unavailable: list[str] = []
    paths = select_images(buffer.getvalue(), views, source.where(METADATA))
    for relpath in tqdm(paths, unit="file", desc="hash", disable=None, file=sys.stderr):
        try:
            entries.append(Entry(relpath, transfer(source, relpath, None, retries, timeout, backoff_s)))
        except Missing:
            unavailable.append(relpath)
            tqdm.write(
                f"warning: {relpath} is not available at {source.where(relpath)}; listed as unavailable",
                file=sys.stderr,
            )
    return entries, unavailable


def manifest_cli(argv: list[str]) -> int:
    """`covidxray manifest --commit SHA`: write the sha256 manifest of that commit's selected files."""
    parser = argparse.ArgumentParser(prog="covidxray manifest", description=manifest_cli.__doc__)
    parser.add_argument("--commit", required=True, help="the upstream commit (40 hex digits)")
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"GitHub owner/name (default {DEFAULT_REPO})")
    parser.add_argument("--views", nargs="+", default=["PA"], help="X-ray views to select (default PA)")
    parser.add_argument("--out", default=DEFAULT_MANIFEST, help=f"file to write (default {DEFAULT_MANIFEST})")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="URL prefix of raw files")
    parser.add_argument("--mirror", help=f"mirror folder (default ${MIRROR_ENV}, else {DEFAULT_MIRROR})")
    parser.add_argument("--no-mirror", action="store_true", help="read --base-url even if a mirror exists")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-fA-F]{40}", args.commit):
        raise CovidXrayError(f"--commit must be a full 40-digit hex commit, got {args.commit!r}")
    views = [v.strip() for item in args.views for v in item.split(",") if v.strip()]
    if args.no_mirror:
        mirror = None
    elif args.mirror:
        mirror = Path(args.mirror)
        if not mirror.is_dir():
            raise CovidXrayError(f"--mirror {mirror} is not a directory")
    else:
        mirror = find_mirror(Path.cwd(), os.environ)
    source = resolve_source(args.base_url, args.repo, args.commit, mirror)
    print(f"manifest: hashing {args.repo}@{args.commit[:12]} from {source.where('')}", file=sys.stderr)
    entries, unavailable = build_manifest(source, views, args.retries, args.timeout)
    write_manifest(Path(args.out), entries, args.repo, args.commit, views, unavailable)
    print(f"wrote {args.out}: {len(entries)} files, {len(unavailable)} unavailable at the source")
    return 0
