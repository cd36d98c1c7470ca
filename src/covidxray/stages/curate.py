"""curate stage: every labelled image of every collection of `data.collections`, decoded once (data/curated/).

A collection is configuration (conf/collection/<name>.yaml, see data/collections.py): the stage
lists each one's images by its definition (data/listing.py; every input problem stops it before
any decoding), decodes every image once to grayscale at data.store_size (data/curation.py),
removes exact duplicates and ties near-duplicates to one patient and one `dup_group` across all
collections (data/dedupe.py), and writes an audit (audit.json, audit.md) of what the set is made
of, per collection too, and whether something other than disease (image geometry, format) gives
the label away. A collection's rows of no class of the task (its `probe`: the COVID-19 image
collection's non-COVID adult X-rays) are kept apart as probe.npy/probe.csv, the same-source
probe of the loco stage. Which collections train a model and which are its external set is
decided later (`data.sources`), so a model can be trained in either direction without curating
again. Outputs: images.npy, index.csv, classes.json (see images.py), probe.npy, probe.csv,
collections.json (per-collection facts, citation and license), audit.json, audit.md.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images
from covidxray.data.audit import audit, audit_markdown
from covidxray.data.collections import FACTS_FILE
from covidxray.data.curation import COLUMNS, build_index, decode_records
from covidxray.data.dedupe import clean_probe, dedupe
from covidxray.data.listing import list_collections
from covidxray.infra.outputs import FIGURE_DIGITS, json_safe, replace_dir
from covidxray.settings.curate import curate_settings


def curate(s) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray, dict]:
    """List, decode and deduplicate the images of CurateSettings `s`: (index, pixels, probe index,
    probe pixels, audit report)."""
    records, probe = list_collections(s.collections, s.raw, s.external, s.task)
    both = pd.concat([records, probe], ignore_index=True)
    records, pixels_of, missing = decode_records(both, s.store_size, s.resize)
    is_probe = (records["label"] == "other").to_numpy()
    kept, dedupe_report = dedupe(records[~is_probe], s.phash_distance, [c.name for c in s.collections])
    classes = list(s.classes)
    index = build_index(kept, classes)
    if index["label"].nunique() < len(classes):
        absent = sorted(set(classes) - set(index["label"]))
        raise CovidXrayError(
            f"no images left for class(es) {', '.join(absent)}: check data.collections (their labels and filters) "
            "and the inputs"
        )
    probe, probe_dropped = clean_probe(records[is_probe], index, s.phash_distance)
    pixels = np.stack([pixels_of[f] for f in index["file"]]).astype(np.uint8)
    size = s.store_size
    probe_pixels = np.stack([pixels_of[f] for f in probe["file"]] or [np.zeros((size, size))]).astype(np.uint8)

    described = {
        c.name: {"kind": c.kind, "age_group": c.age_group, "citation": c.citation, "license": c.license}
        for c in s.collections
    }
    report = audit(index, pixels, classes, s.seed, described=described)
    report["config"] = {
        "task": s.task,
        "views": list(s.views),
        "store_size": size,
        "resize": s.resize,
        "collections": [c.name for c in s.collections],
        "phash_distance": s.phash_distance,
        "seed": s.seed,
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
    return index, pixels, probe, probe_pixels[: len(probe)], json_safe(report, FIGURE_DIGITS)


def main(cfg) -> None:
    """Stage entry: check the settings and every collection's inputs, then select, decode,
    deduplicate and audit the images; write data/curated/ whole or not at all."""
    s = curate_settings(cfg)
    index, pixels, probe, probe_pixels, report = curate(s)

    def write(tmp) -> None:
        images.save_curated(tmp, pixels, index, list(s.classes))
        np.save(tmp / images.PROBE_IMAGES_FILE, probe_pixels)
        probe.reindex(columns=[c for c in COLUMNS if c != "y"]).to_csv(tmp / images.PROBE_INDEX_FILE, index=False)
        (tmp / FACTS_FILE).write_text(json.dumps(report["collections"], indent=2) + "\n")
        (tmp / "audit.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "audit.md").write_text(audit_markdown(report))

    replace_dir(s.curated, write, by="curate")
    missing = report["selection"]["missing_files"]
    if missing:
        print(f"curate: warning: {len(missing)} selected file(s) missing, e.g. {missing[0]}", file=sys.stderr)
    for item in report["shortcuts"]:
        print(f"curate: WARNING: shortcut: {item['warning']}", file=sys.stderr)
    counts = ", ".join(f"{c} {n}" for c, n in report["per_class"].items())
    print(
        f"curate: wrote {s.curated} ({counts}; {report['patients']} patients; {len(probe)} probe images; "
        f"collections {', '.join(c.name for c in s.collections)})",
        file=sys.stderr,
    )
