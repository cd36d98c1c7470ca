"""curate stage: every labelled image of every collection, decoded once (data/curated/).

Three collections: `ieee8023` (the COVID-19 image collection in data/raw, chosen by metadata),
`kermany` (the Kaggle/Mendeley NORMAL and viral PNEUMONIA X-rays of children in data/external)
and `radiography` (adult COVID-19 and adult normal X-rays of the COVID-19 Radiography Database
in data/external). Which of them train a model and which are its external set is decided later
(`data.sources`, see sources.py), so a model can be trained in either direction without curating
again. Every image is decoded once to grayscale at data.store_size (models resize from there),
exact duplicates are removed, near-duplicates are tied to one patient and one `dup_group`, and an
audit (audit.json, audit.md) records what the set is made of and whether something other than
disease (image geometry, format) gives the label away. The collection's other findings (its
non-COVID adult X-rays, no class of the task) are kept apart as probe.npy/probe.csv: the
same-source probe of the external stage. Outputs: images.npy, index.csv, classes.json (see
images.py), probe.npy, probe.csv, audit.json, audit.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images as imgs
from covidxray.data.audit import UNKNOWN, audit, audit_markdown
from covidxray.data.sources import COLLECTIONS, IEEE8023, KERMANY, RADIOGRAPHY, TASKS
from covidxray.infra.outputs import json_safe, replace_dir

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
COLUMNS = [
    "image_id",
    "label",
    "y",
    "patient_id",
    "source",
    "file",
    "finding",
    "view",
    "sex",
    "age",
    "orig_width",
    "orig_height",
    "orig_format",
    "orig_mode",
    "sha256",
    "phash",
    "dup_group",
]
ADULT_AGE = 18
RADIOGRAPHY_DIR = "covid19-radiography"
RADIOGRAPHY_CLASSES = {"covid": "COVID", "normal": "Normal"}
# Infectious pneumonias of the collection (bacterial, viral, fungal); COVID-19 is matched first.
INFECTIOUS = re.compile(
    r"pneumonia|bacterial|viral|streptococc|staphylococc|klebsiella|pneumocystis|\bsars\b|\bmers\b"
    r"|legionella|mycoplasma|e\.\s?coli|varicella|influenza|chlamydophila|chlamydia|aspergill"
    r"|nocardia|herpes",
    re.IGNORECASE,
)
NOT_INFECTIOUS = re.compile(r"lipoid", re.IGNORECASE)
KAGGLE_NORMAL = re.compile(r"^(?:NORMAL2-)?(IM-\d+)-")
KAGGLE_PERSON = re.compile(r"^(person\d+)_(?:virus|bacteria)_\d+")


def check_params(task: str, resize: str, store_size, phash_distance, views, collections) -> None:
    """Reject unknown or impossible data.* values before any work, naming the key and allowed values."""
    if task not in TASKS:
        raise CovidXrayError(f"data.task must be one of {', '.join(TASKS)}, got {task!r}")
    imgs.check_resize_policy(resize)
    if not isinstance(store_size, int) or isinstance(store_size, bool) or store_size < 8:
        raise CovidXrayError(f"data.store_size must be an integer >= 8, got {store_size!r}")
    unknown = [c for c in collections or [] if c not in COLLECTIONS]
    if not collections or unknown:
        raise CovidXrayError(f"data.collections must list collections of {', '.join(COLLECTIONS)}, got {collections!r}")
    if not isinstance(phash_distance, int) or isinstance(phash_distance, bool) or not 0 <= phash_distance <= 64:
        raise CovidXrayError(f"data.phash_distance must be an integer in 0..64, got {phash_distance!r}")
    if not views or any(not isinstance(v, str) for v in views):
        raise CovidXrayError(f"data.views must be a non-empty list of view names, got {views!r}")


def collection_label(finding: str, task: str) -> str | None:
    """The class of a collection finding, or None when it belongs to no class of `task`.

    covid: the finding names COVID-19 (also "COVID-19, ARDS"). pneumonia (three_class only):
    an infectious pneumonia, bacterial, viral or fungal (Pneumonia, Streptococcus, Klebsiella,
    Pneumocystis, SARS, Legionella, Mycoplasma, E.Coli, Varicella, Influenza, Chlamydophila,
    Bacterial, ...). Excluded: No Finding, ARDS alone (a syndrome, not an infection) and Lipoid
    pneumonia (not infectious).
    """
    finding = str(finding) if isinstance(finding, str) else ""
    if "COVID-19" in finding:
        return "covid"
    if task == "three_class" and INFECTIOUS.search(finding) and not NOT_INFECTIOUS.search(finding):
        return "pneumonia"
    return None


def _sex(value) -> str:
    value = str(value).strip().upper() if isinstance(value, str) else ""
    return value if value in ("M", "F") else UNKNOWN


def select_collection(metadata: pd.DataFrame, views, task: str, raw_dir: Path = Path("data/raw")) -> pd.DataFrame:
    """The collection's X-ray rows of `views` that belong to a class of `task`, as image records."""
    need = {"patientid", "finding", "modality", "view", "filename", "sex", "age"}
    if need - set(metadata.columns):
        raise CovidXrayError(f"metadata.csv lacks columns: {', '.join(sorted(need - set(metadata.columns)))}")
    rows = metadata[(metadata["modality"] == "X-ray") & metadata["view"].isin(list(views))].copy()
    rows["label"] = [collection_label(f, task) for f in rows["finding"]]
    rows = rows[rows["label"].notna()]
    folder = rows["folder"] if "folder" in rows.columns else pd.Series("images", index=rows.index)
    files = [(Path(raw_dir) / str(d) / str(f)).as_posix() for d, f in zip(folder.fillna("images"), rows["filename"])]
    return pd.DataFrame(
        {
            "label": rows["label"].astype(str).to_numpy(),
            "patient_id": [f"{IEEE8023}-{p}" for p in rows["patientid"]],
            "source": IEEE8023,
            "file": files,
            "finding": rows["finding"].astype(str).to_numpy(),
            "view": rows["view"].astype(str).to_numpy(),
            "sex": [_sex(s) for s in rows["sex"]],
            "age": pd.to_numeric(rows["age"], errors="coerce").astype(float).to_numpy(),
        }
    )


def patient_id_from_kaggle_name(name: str) -> str | None:
    """The Kermany patient of a Kaggle file name, prefixed `kermany-`; None if the name has no patient.

    `IM-0587-0001.jpeg` and `NORMAL2-IM-0587-0001-0002.jpeg` -> kermany-IM-0587 (the IM-XXXX part
    is the patient, so both spellings are one patient); `person1261_virus_2147.jpeg` -> kermany-person1261.
    """
    name = Path(name).name
    match = KAGGLE_NORMAL.match(name) or KAGGLE_PERSON.match(name)
    return f"{KERMANY}-{match.group(1)}" if match else None


def _record(label, patient, source, file, finding, view=UNKNOWN, sex=UNKNOWN, age=np.nan) -> dict:
    return {
        "label": label,
        "patient_id": patient,
        "source": source,
        "file": Path(file).as_posix(),
        "finding": finding,
        "view": view,
        "sex": sex,
        "age": age,
    }


RECORD_COLUMNS = ["label", "patient_id", "source", "file", "finding", "view", "sex", "age"]


def _images_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CovidXrayError(f"external images missing: {directory} (run `dvc pull data.dvc`)")
    return [p for p in sorted(directory.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def list_kermany(external_dir: Path, task: str) -> pd.DataFrame:
    """Kermany image records: chest_xray/NORMAL as normal, and chest_xray/PNEUMONIA as pneumonia (three_class)."""
    folders = {"normal": ("NORMAL", "No Finding")}
    if task == "three_class":
        folders["pneumonia"] = ("PNEUMONIA", "Pneumonia (viral)")
    records = []
    for label, (folder, finding) in folders.items():
        for path in _images_in(Path(external_dir) / "chest_xray" / folder):
            patient = patient_id_from_kaggle_name(path.name)
            if patient is None:
                raise CovidXrayError(f"cannot tell the patient of {path} (expected IM-XXXX-... or personNNN_virus_MMM)")
            records.append(_record(label, patient, KERMANY, path, finding))
    return pd.DataFrame(records, columns=RECORD_COLUMNS)


def list_radiography(external_dir: Path) -> pd.DataFrame:
    """COVID-19 Radiography Database records (adults): COVID as covid, Normal as normal. It has no
    patient ids, so every image is its own patient until near-duplicate detection groups them."""
    records = []
    for label, folder in RADIOGRAPHY_CLASSES.items():
        for path in _images_in(Path(external_dir) / RADIOGRAPHY_DIR / folder):
            finding = "COVID-19" if label == "covid" else "No Finding"
            records.append(_record(label, f"{RADIOGRAPHY}-{path.stem}", RADIOGRAPHY, path, finding))
    return pd.DataFrame(records, columns=RECORD_COLUMNS)


def select_probe(metadata: pd.DataFrame, views, task: str, raw_dir: Path) -> pd.DataFrame:
    """The collection's adult X-rays of `views` that belong to no class of `task` (other pneumonias,
    ARDS, ...): what a model that learnt the collection instead of COVID-19 calls covid."""
    rows = metadata[(metadata["modality"] == "X-ray") & metadata["view"].isin(list(views))]
    rows = rows[[collection_label(f, task) is None for f in rows["finding"]]]
    age = pd.to_numeric(rows["age"], errors="coerce")
    rows = rows[~(age < ADULT_AGE)]
    folder = rows["folder"] if "folder" in rows.columns else pd.Series("images", index=rows.index)
    return pd.DataFrame(
        [
            _record(
                "other",
                f"{IEEE8023}-{r.patientid}",
                IEEE8023,
                Path(raw_dir) / str(d) / str(r.filename),
                str(r.finding),
                str(r.view),
                _sex(r.sex),
                float(pd.to_numeric(r.age, errors="coerce")),
            )
            for r, d in zip(rows.itertuples(), folder.fillna("images"))
        ],
        columns=RECORD_COLUMNS,
    )


def assign_image_ids(records: pd.DataFrame) -> pd.Series:
    """`source-stem` per record; the whole file name where two files of a source share a stem."""
    stems = [f"{s}-{Path(f).stem}" for s, f in zip(records["source"], records["file"])]
    names = [f"{s}-{Path(f).name}" for s, f in zip(records["source"], records["file"])]
    files_per_stem = pd.Series(list(records["file"])).groupby(stems).nunique()
    return pd.Series([n if files_per_stem[s] > 1 else s for s, n in zip(stems, names)], index=records.index)


def _decode(file: str, size: int, policy: str) -> dict:
    """Worker: decode one file once; its resized pixels, geometry, sha256 and phash (or the error)."""
    import imagehash
    from PIL import Image

    try:
        gray, info = imgs.read_grayscale(Path(file))
    except CovidXrayError as err:
        return {"file": file, "error": str(err)}
    return {
        "file": file,
        "pixels": imgs.resize(gray, size, policy),
        "orig_width": info["width"],
        "orig_height": info["height"],
        "orig_format": info["format"],
        "orig_mode": info["mode"],
        "sha256": info["sha256"],
        "phash": str(imagehash.phash(Image.fromarray(gray))),
    }


def decode_files(files: list[str], size: int, policy: str, workers: int = 1) -> list[dict]:
    """Decode every file once, in `workers` processes, in order, with a progress bar on stderr."""
    from tqdm import tqdm

    bar = dict(total=len(files), desc="curate: decoding", unit="img", file=sys.stderr, disable=None)
    if workers <= 1 or len(files) < 2:
        return [_decode(f, size, policy) for f in tqdm(files, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_decode, files, repeat(size), repeat(policy), chunksize=4), **bar))


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


def _drop_exact(df: pd.DataFrame, patients: _UnionFind) -> tuple[pd.DataFrame, list, list]:
    """Keep one of each set of byte-identical images (tying their patients); drop every copy of an
    image found under two classes. Returns the kept rows, the duplicate groups and the conflicts."""
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
        groups.append({**entry, "patients": sorted(set(group["patient_id"]))})
        drop.update(group.index[1:])
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


def dedupe(records: pd.DataFrame, phash_distance: int) -> tuple[pd.DataFrame, dict]:
    """Drop exact duplicates (sha256, keep one), tie near-duplicates (phash) to one patient and one
    dup_group, and drop every copy of an image found under two classes. Returns the kept records
    and a report. Linked patients are merged (union-find) into the smallest id, so the split never
    puts copies of one image on both sides, and no external set holds a copy of a training image.
    """
    df = records.sort_values(["image_id", "patient_id", "file"], kind="stable").reset_index(drop=True)
    patients = _UnionFind()
    df, exact_groups, exact_conflicts = _drop_exact(df, patients)
    df, near_groups, near_conflicts = _tie_near(df, patients, phash_distance)
    conflicts = exact_conflicts + near_conflicts
    merged = df["patient_id"].map(patients.find)
    report = {
        "exact_duplicates_removed": int(sum(g["rows"] - 1 for g in exact_groups)),
        "exact_duplicate_groups": exact_groups,
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


def build_index(records: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The index.csv table: contract columns, y from the class order, sorted by class then image_id."""
    df = records.copy()
    df["y"] = df["label"].map({c: i for i, c in enumerate(classes)}).astype(int)
    df["age"] = df["age"].astype(float)
    df = df.sort_values(["y", "image_id"], kind="stable").reset_index(drop=True)
    if df["image_id"].duplicated().any():
        raise CovidXrayError(f"duplicate image ids: {sorted(df.loc[df['image_id'].duplicated(), 'image_id'])[:5]}")
    return df[COLUMNS]


def read_metadata(path: Path) -> pd.DataFrame:
    """The collection's metadata.csv."""
    if not Path(path).is_file():
        raise CovidXrayError(f"metadata missing: {path} (run `dvc repro fetch`)")
    return pd.read_csv(path, dtype={"patientid": str, "filename": str, "folder": str})


def gather(raw: Path, external: Path, views, task: str, collections) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(class records, probe records) of the chosen collections; probe records are the
    collection's other findings, only when ieee8023 is chosen."""
    metadata = read_metadata(raw / "metadata.csv") if IEEE8023 in collections else None
    parts = {
        IEEE8023: lambda: select_collection(metadata, views, task, raw),
        KERMANY: lambda: list_kermany(external, task),
        RADIOGRAPHY: lambda: list_radiography(external),
    }
    records = pd.concat([parts[c]() for c in COLLECTIONS if c in collections], ignore_index=True)
    probe = select_probe(metadata, views, task, raw) if metadata is not None else pd.DataFrame(columns=RECORD_COLUMNS)
    return records, probe


def decode_records(records: pd.DataFrame, size: int, policy: str) -> tuple[pd.DataFrame, dict, list[str]]:
    """Records of present files with image ids and file attributes, their pixels by file, and the
    missing files. An unreadable input is an error: inputs are pinned and verified."""
    present = records["file"].map(lambda f: Path(f).is_file())
    missing = sorted(set(records.loc[~present, "file"]))
    records = records[present].reset_index(drop=True)
    records["image_id"] = assign_image_ids(records)
    decoded = decode_files(sorted(set(records["file"])), size, policy, workers=min(os.cpu_count() or 1, 8))
    errors = [r["error"] for r in decoded if "error" in r]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CovidXrayError(f"{errors[0]}{more}")
    decoded = {r["file"]: r for r in decoded}
    for col in ("orig_width", "orig_height", "orig_format", "orig_mode", "sha256", "phash"):
        records[col] = [decoded[f][col] for f in records["file"]]
    return records, {f: r["pixels"] for f, r in decoded.items()}, missing


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


def main(cfg) -> None:
    """Stage entry: select, decode, deduplicate and audit the images; write data/curated/."""
    data = cfg.data
    task, policy = str(data.task), str(data.resize)
    views = list(data.views) if data.views is not None else []
    collections = list(data.collections) if data.get("collections") is not None else []
    size, distance, seed = data.store_size, data.phash_distance, int(cfg.seed)
    check_params(task, policy, size, distance, views, collections)
    classes = TASKS[task]
    raw, external, out = Path(cfg.paths.raw), Path(cfg.paths.external), Path(cfg.paths.curated)

    records, probe = gather(raw, external, views, task, collections)
    records, pixels_of, missing = decode_records(pd.concat([records, probe], ignore_index=True), size, policy)
    is_probe = (records["label"] == "other").to_numpy()
    kept, dedupe_report = dedupe(records[~is_probe], distance)
    index = build_index(kept, classes)
    if index["label"].nunique() < len(classes):
        absent = sorted(set(classes) - set(index["label"]))
        raise CovidXrayError(f"no images left for class(es) {', '.join(absent)}: check data.views and the inputs")
    probe, probe_dropped = clean_probe(records[is_probe], index, distance)
    pixels = np.stack([pixels_of[f] for f in index["file"]]).astype(np.uint8)
    probe_pixels = np.stack([pixels_of[f] for f in probe["file"]] or [np.zeros((size, size))]).astype(np.uint8)

    report = audit(index, pixels, classes, seed)
    report["config"] = {
        "task": task,
        "views": views,
        "store_size": size,
        "resize": policy,
        "collections": collections,
        "phash_distance": distance,
        "seed": seed,
    }
    report["selection"] = {
        "records": int((~is_probe).sum()) + len(missing),
        "missing_files": missing,
        "records_sharing_a_file": int(records["file"].duplicated().sum()),
    }
    report["dedupe"] = dedupe_report
    report["probe"] = {
        "images": int(len(probe)),
        "near_duplicates_of_curated_dropped": probe_dropped,
        "findings": probe["finding"].value_counts().sort_index().to_dict(),
    }
    report = json_safe(report, digits=4)

    def write(tmp: Path) -> None:
        imgs.save_curated(tmp, pixels, index, classes)
        np.save(tmp / imgs.PROBE_IMAGES_FILE, probe_pixels[: len(probe)])
        probe.reindex(columns=[c for c in COLUMNS if c != "y"]).to_csv(tmp / imgs.PROBE_INDEX_FILE, index=False)
        (tmp / "audit.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "audit.md").write_text(audit_markdown(report))

    replace_dir(out, write, by="curate")
    if missing:
        print(f"curate: warning: {len(missing)} selected file(s) missing, e.g. {missing[0]}", file=sys.stderr)
    for item in report["shortcuts"]:
        print(f"curate: WARNING: shortcut: {item['warning']}", file=sys.stderr)
    counts = ", ".join(f"{c} {n}" for c, n in report["per_class"].items())
    print(f"curate: wrote {out} ({counts}; {report['patients']} patients; {len(probe)} probe images)", file=sys.stderr)
