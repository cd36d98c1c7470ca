"""Deduplication across every collection: exact copies (sha256) and near-duplicates (perceptual hash).

Exact copies are dropped (the copy of the collection listed first in data.collections kept, their
patients tied: pinned collections keep their images and metadata when a new collection repeats
them), near-duplicates are tied to one patient
and one `dup_group`, and every copy of an image found under two classes is dropped, across
collections and classes alike, so a split never puts copies of one image on both sides and no
external set holds a copy of a training image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd


class _UnionFind:
    """Disjoint sets whose representative is the smallest member (so merges are order-independent)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def phash_pairs(phashes: list[str], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit perceptual hashes differ in at most `max_distance` bits."""
    if len(phashes) < 2:
        return []
    bits = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    dist = np.bitwise_count(bits[:, None] ^ bits[None, :])
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return list(zip(i.tolist(), j.tolist()))


def _drop_exact(df: pd.DataFrame, patients: _UnionFind, order: Sequence[str]) -> tuple[pd.DataFrame, list, list]:
    """Keep one of each set of byte-identical images: the copy of the collection first in `order`
    (then the smallest image_id; df is sorted by it), tying their patients; drop every copy of an
    image found under two classes. Returns the kept rows, the duplicate groups and the conflicts."""
    rank = {name: i for i, name in enumerate(order)}
    conflicts, groups, drop = [], [], set()
    for sha, group in df.groupby("sha256", sort=True):
        if len(group) < 2:
            continue
        entry = {
            "sha256": sha,
            "files": sorted(set(group["file"])),
            "labels": sorted(set(group["label"])),
            "rows": int(len(group)),
        }
        if group["label"].nunique() > 1:
            conflicts.append({"kind": "exact", **entry})
            drop.update(group.index)
            continue
        for p in group["patient_id"]:
            patients.union(group["patient_id"].iloc[0], p)
        keep = group.index[int(np.argmin([rank.get(s, len(rank)) for s in group["source"]]))]
        lost = group.drop(index=keep)
        groups.append(
            {**entry, "patients": sorted(set(group["patient_id"]))}
            | {"kept": str(group.at[keep, "source"]), "removed_from": _ordered(Counter(lost["source"]), order)}
        )
        drop.update(lost.index)
    return df.drop(index=sorted(drop)).reset_index(drop=True), groups, conflicts


def _tie_near(df: pd.DataFrame, patients: _UnionFind, phash_distance: int) -> tuple[pd.DataFrame, list, list]:
    """Give near-duplicates (phash) one dup_group (the smallest image_id) and tie their patients;
    drop near-duplicate groups that span two classes. Returns the rows, the groups, the conflicts."""
    images = _UnionFind()
    for i, j in phash_pairs(list(df["phash"]), phash_distance):
        images.union(i, j)
    components: dict[int, list[int]] = {}
    for i in range(len(df)):
        components.setdefault(images.find(i), []).append(i)
    df = df.assign(dup_group=df["image_id"])
    groups, conflicts, drop = [], [], set()
    for members in components.values():
        if len(members) < 2:
            continue
        group = df.iloc[members]
        entry = {"image_ids": list(group["image_id"]), "labels": sorted(set(group["label"]))}
        if group["label"].nunique() > 1:
            conflicts.append({"kind": "near", **entry})
            drop.update(members)
            continue
        for p in group["patient_id"]:
            patients.union(group["patient_id"].iloc[0], p)
        df.loc[df.index[members], "dup_group"] = min(group["image_id"])
        groups.append({**entry, "patients": sorted(set(group["patient_id"]))})
    return df.drop(index=sorted(drop)).reset_index(drop=True), groups, conflicts


def dedupe(records: pd.DataFrame, phash_distance: int, order: Sequence[str] = ()) -> tuple[pd.DataFrame, dict]:
    """Drop exact duplicates (sha256; the copy kept is that of the collection first in `order`, the
    order of data.collections), tie near-duplicates (phash) to one patient and one dup_group, and
    drop every copy of an image found under two classes. Returns the kept records and a report
    (with the images each collection lost to exact copies elsewhere). Linked patients are merged
    (union-find) into the smallest id, so the split never puts copies of one image on both sides,
    and no external set holds a copy of a training image.
    """
    df = records.sort_values(["image_id", "patient_id", "file"], kind="stable").reset_index(drop=True)
    patients = _UnionFind()
    df, exact_groups, exact_conflicts = _drop_exact(df, patients, order)
    lost = sum((Counter(g["removed_from"]) for g in exact_groups), Counter())
    df, near_groups, near_conflicts = _tie_near(df, patients, phash_distance)
    conflicts = exact_conflicts + near_conflicts
    merged = df["patient_id"].map(patients.find)
    report = {
        "exact_duplicates_removed": int(sum(g["rows"] - 1 for g in exact_groups)),
        "exact_duplicate_groups": exact_groups,
        "exact_duplicates_removed_from": _ordered(lost, order),
        "near_duplicate_groups": near_groups,
        "near_duplicate_images": int(sum(len(g["image_ids"]) for g in near_groups)),
        "patients_merged": int((merged != df["patient_id"]).groupby(df["patient_id"]).any().sum()),
        "cross_class_conflicts": conflicts,
        "cross_class_images_dropped": int(
            sum(c["rows"] if c["kind"] == "exact" else len(c["image_ids"]) for c in conflicts)
        ),
    }
    df["patient_id"] = merged
    return df, report


def _ordered(counts: Counter, order: Sequence[str]) -> dict[str, int]:
    """{collection: count} in the order of `order` (then by name)."""
    rank = {name: i for i, name in enumerate(order)}
    return {str(k): int(counts[k]) for k in sorted(counts, key=lambda k: (rank.get(k, len(rank)), k))}


def clean_probe(probe: pd.DataFrame, kept: pd.DataFrame, phash_distance: int) -> tuple[pd.DataFrame, int]:
    """Probe records without exact copies and without near-duplicates of any curated image."""
    probe = probe.sort_values("image_id").drop_duplicates("sha256").reset_index(drop=True)
    if probe.empty or kept.empty:
        return probe, 0
    a = np.array([int(h, 16) for h in probe["phash"]], dtype=np.uint64)
    b = np.array([int(h, 16) for h in kept["phash"]], dtype=np.uint64)
    near = (np.bitwise_count(a[:, None] ^ b[None, :]) <= phash_distance).any(axis=1)
    near |= probe["sha256"].isin(set(kept["sha256"])).to_numpy()
    return probe[~near].reset_index(drop=True), int(near.sum())
