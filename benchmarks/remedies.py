"""Remedies for the source shortcut, measured in both directions (run by hand; the table goes in
conf/experiment/default.yaml and the README).

For each remedy (Hydra overrides) and each direction (the default roles: trained on the tutorial's
collections, external = radiography; reverse: trained on radiography, external = ieee8023 +
Kermany), runs train -> evaluate -> external with the real stages into
outputs/remedies/<remedy>/<direction>/ (its own MLflow store), then prints one markdown table:
internal CV AUC, internal test AUC, external AUC [95% CI], external sensitivity and specificity at
the saved threshold, and the wall time. Remedies that change curation (resize=pad) get their own
curated store and splits.

usage: .venv/bin/python benchmarks/remedies.py [--only NAME ...] [--folds N] [--out DIR]
       .venv/bin/python benchmarks/remedies.py --tiny --out DIR [overrides...]   # a smoke test: the
       default remedy, one direction, the smoke experiment (overrides: e.g. paths.curated=...)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REVERSE = [
    "data.sources.train.covid=[radiography]",
    "data.sources.train.normal=[radiography]",
    "data.sources.external.covid=[ieee8023]",
    "data.sources.external.normal=[kermany]",
]
ADULT = [
    "data.sources.train.covid=[ieee8023]",
    "data.sources.train.normal=[radiography]",
    "data.sources.external.covid=[radiography]",
    "data.sources.external.normal=[kermany]",
]
ADULT_REVERSE = [
    "data.sources.train.covid=[radiography]",
    "data.sources.train.normal=[kermany]",
    "data.sources.external.covid=[ieee8023]",
    "data.sources.external.normal=[radiography]",
]
LITE0 = ["model=efficientnet_lite0", "data.image_size=224"]


def both(extra: list[str]) -> tuple[list[str], list[str]]:
    """A remedy's overrides in the default direction and in the reverse one."""
    return extra, extra + REVERSE


REMEDIES = {  # name: (overrides trained on the tutorial's collections, overrides trained on radiography)
    "default": both([]),
    "clahe": both(["data.normalize=clahe"]),
    "equalize": both(["data.normalize=equalize"]),
    "crop_border_0.1": both(["data.crop_border=0.1"]),
    "resize_pad": both(["data.resize=pad"]),
    "augment_standard": both(["augment=standard"]),
    "image_size_64": both(["data.image_size=64"]),
    "adult_normals": (ADULT, ADULT_REVERSE),
    "efficientnet_lite0": both(LITE0),
    "efficientnet_lite0_crop_border_0.1": both(LITE0 + ["data.crop_border=0.1"]),
    "efficientnet_lite0_clahe": both(LITE0 + ["data.normalize=clahe"]),
    "efficientnet_lite0_adult_normals": (LITE0 + ADULT, LITE0 + ADULT_REVERSE),
}
CURATE_KEYS = ("data.resize=", "data.store_size=", "data.task=", "data.views=", "data.collections", "collection=")


def compose(overrides: list[str]):
    from covidxray.infra.config import compose as compose_conf

    return compose_conf(overrides)


def prepare_store(overrides: list[str], out: Path) -> list[str]:
    """Overrides that point at a curated store built with the remedy's curation settings (built
    once), or none when the remedy keeps the pipeline's store."""
    from covidxray.stages import curate, split

    custom = [o for o in overrides if o.startswith(CURATE_KEYS)]
    if not custom:
        return []
    name = "-".join(o.split("=", 1)[1] for o in custom).replace("/", "_")
    paths = [f"paths.curated={out / f'curated-{name}'}", f"paths.splits={out / f'splits-{name}.csv'}"]
    if not (out / f"splits-{name}.csv").is_file():
        cfg = compose(custom + paths)
        curate.main(cfg)
        split.main(cfg)
    return paths


def run_one(name: str, direction: str, overrides: list[str], out: Path, folds: int, extra=()) -> dict:
    """train -> evaluate -> external for one remedy and direction; the figures for the table."""
    import keras

    from covidxray.stages import evaluate, external, train

    run_dir = out / name / direction
    paths = [
        f"paths.models={run_dir / 'models'}",
        f"paths.reports={run_dir / 'reports'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"cv.folds={folds}",
    ]
    cfg = compose(overrides + prepare_store(overrides, out) + paths + list(extra))
    start = time.perf_counter()
    for stage in (train, evaluate, external):
        keras.backend.clear_session()
        stage.main(cfg)
    reports = run_dir / "reports"
    cv = json.loads((reports / "cv" / "metrics.json").read_text())
    test = json.loads((reports / "metrics.json").read_text())["test"]
    ext = json.loads((reports / "external" / "metrics.json").read_text())
    return {
        "remedy": name,
        "direction": direction,
        "cv_auc": cv["cv_auc_mean"],
        "test_auc": test["auc"],
        "external": ext["external"],
        "n_external": ext["n_external_images"],
        "same_source": ext["probes"]["same_source_other_finding"].get("share_labelled_covid"),
        "minutes": (time.perf_counter() - start) / 60,
    }


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| remedy | direction | CV AUC | test AUC | external AUC [95% CI] | ext. sens | ext. spec | "
        "same-source other findings called covid | min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["external"]
        lines.append(
            f"| {r['remedy']} | {r['direction']} | {fmt(r['cv_auc'])} | {fmt(r['test_auc'])} | "
            f"{fmt(e.get('auc'))} [{fmt(e.get('auc_ci_low'))}, {fmt(e.get('auc_ci_high'))}] | "
            f"{fmt(e.get('sensitivity'))} | {fmt(e.get('specificity'))} | {fmt(r['same_source'])} | "
            f"{r['minutes']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(REMEDIES), help="remedies to run (default: all)")
    parser.add_argument("--direction", choices=("forward", "reverse", "both"), default="both")
    parser.add_argument("--folds", type=int, default=5, help="CV folds of the 5 split folds to run (2 = quicker)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "remedies")
    parser.add_argument("--tiny", action="store_true", help="default remedy, forward, smoke experiment, 2 folds")
    parser.add_argument("overrides", nargs="*", help="config overrides added to every run")
    args = parser.parse_args(argv)
    extra = list(args.overrides)
    if args.tiny:
        args.only, args.direction, args.folds = ["default"], "forward", 2
        extra = ["experiment=smoke", "evaluate.bootstrap=20", "evaluate.gradcam_per_group=1", *extra]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or list(REMEDIES):
        for direction, overrides in zip(("forward", "reverse"), REMEDIES[name]):
            if args.direction not in ("both", direction):
                continue
            rows.append(run_one(name, direction, overrides, args.out, args.folds, extra))
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
            print(table(rows), file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
