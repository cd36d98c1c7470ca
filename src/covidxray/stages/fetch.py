"""fetch stage: data/raw <- the files of the committed manifest (the COVID-19 image collection at a
pinned commit), each verified by sha256, from the mirror or the network (data.download).
`covidxray manifest --commit SHA` (tools.manifest) writes the manifest for another commit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from covidxray.data.download import check_manifest, fetch_dataset, find_mirror, mib, read_manifest, resolve_source
from covidxray.settings.fetch import fetch_settings


def main(cfg) -> None:
    """Stage entry: data/raw (paths.raw) <- the files of fetch.manifest, verified."""
    settings = fetch_settings(cfg)
    meta, entries = read_manifest(settings.manifest)
    check_manifest(meta, settings.manifest, settings.repo, settings.commit)
    source = resolve_source(settings.base_url, settings.repo, settings.commit, find_mirror(Path.cwd(), os.environ))
    print(f"fetch: {len(entries)} files of {settings.repo}@{settings.commit[:12]} from {source.where('')}")
    if meta["unavailable"]:
        print(f"fetch: {len(meta['unavailable'])} selected files are marked unavailable in {settings.manifest}")
    start = time.perf_counter()
    stats = fetch_dataset(entries, source, settings.raw, settings.retries, settings.timeout_s)
    print(
        f"fetch: {settings.raw}: {stats.reused} files reused, {stats.fetched} fetched "
        f"({mib(stats.bytes_fetched)}), all verified in {time.perf_counter() - start:.1f}s"
    )
