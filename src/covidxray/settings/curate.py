"""The curate stage's settings: the task, the collections and how images are stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidxray.data import collections
from covidxray.infra.config import choice, fail, integer, text, value


@dataclass(frozen=True)
class CurateSettings:
    """Everything the curate stage reads, checked: the collections' definitions included."""

    task: str
    classes: tuple[str, ...]
    views: tuple[str, ...]  # data.views (the ieee8023 definition's view filter refers to it)
    store_size: int
    resize: str
    phash_distance: int
    seed: int
    collections: tuple  # collections.Collection, in the order of data.collections
    raw: Path
    external: Path
    curated: Path


def curate_settings(cfg) -> CurateSettings:
    """Check every key the curate stage reads, every collection definition of data.collections
    (and that no two files of conf/collection/ claim one name), before any file is read."""
    from covidxray.data.images import RESIZE_POLICIES
    from covidxray.infra.config import conf_dir

    task = choice(cfg, "data.task", collections.TASKS)
    resize = choice(cfg, "data.resize", RESIZE_POLICIES)
    store_size = integer(cfg, "data.store_size", 8)
    distance = integer(cfg, "data.phash_distance", 0, "an integer in 0..64")
    if distance > 64:
        fail("data.phash_distance", "an integer in 0..64", distance)
    views = value(cfg, "data.views")
    if not views or isinstance(views, str) or any(not isinstance(v, str) for v in views):
        fail("data.views", "a non-empty list of view names", views if views is None else list(views))
    if (conf_dir() / "collection").is_dir():
        collections.check_definition_files(conf_dir() / "collection")
    return CurateSettings(
        task=task,
        classes=tuple(collections.TASKS[task]),
        views=tuple(views),
        store_size=store_size,
        resize=resize,
        phash_distance=distance,
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        collections=collections.parse_collections(value(cfg, "data.collections"), task),
        raw=Path(text(cfg, "paths.raw")),
        external=Path(text(cfg, "paths.external")),
        curated=Path(text(cfg, "paths.curated")),
    )
