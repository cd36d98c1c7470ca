"""Recipes judged by leave-one-collection-out (run by hand; the table goes in the README and
conf/experiment/default.yaml).

For each recipe (Hydra overrides: the default trained on every collection, the tutorial's pair,
remedies for the shortcuts), runs the loco library (evaluation/loco.py, what the loco stage runs)
on the pipeline's curated store and prints one markdown table: per held-out group, AUC [95% CI],
the shortcut baseline and the margin, specificity at the transferred threshold and at a threshold
calibrated on K images of the group, then the mean and worst AUC and the wall time. Recipes that
change curation (resize=pad) get their own curated store and splits.

usage: .venv/bin/python benchmarks/remedies.py [--only NAME ...] [--folds N] [--out DIR] [OVERRIDE ...]
       .venv/bin/python benchmarks/remedies.py --tiny --out DIR [overrides...]   # a smoke test: the
       default recipe, the smoke experiment, 2 folds (overrides: e.g. paths.curated=...)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ["experiment=tutorial_sources"]
REVERSE = ["experiment=cross_dataset_reverse"]
ADULT = ["experiment=adult_normals"]
REMEDIES = {  # name: overrides of the project default (EfficientNet-Lite0, 224 px, border cut, every collection)
    "default": [],
    "tutorial_sources": TUTORIAL,
    "cross_dataset_reverse": REVERSE,
    "adult_normals": ADULT,
    "crop_border_0": ["data.crop_border=0"],
    "clahe": ["data.normalize=clahe"],
    "equalize": ["data.normalize=equalize"],
    "resize_pad": ["data.resize=pad"],
    "undersample": ["data.balance=undersample"],
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


def run_one(name: str, overrides: list[str], out: Path, folds: int) -> dict:
    """Leave-one-collection-out of one recipe; the figures for the table."""
    from covidxray.settings.loco import loco_settings
    from covidxray.evaluation import loco

    cfg = compose(overrides + prepare_store(overrides, out) + [f"cv.folds={folds}"])
    s = loco_settings(cfg)
    result = loco.run(s.train.curated, s.train.splits, s.recipe, s.spec, s.seed)
    return {"recipe": name, "groups": result["groups"], **result["summary"], "minutes": result["seconds"] / 60}


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | held out | AUC [95% CI] | shortcut baseline | margin | spec. transferred | spec. calibrated "
        "(K) | LOCO mean / worst AUC | min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for i, (group, g) in enumerate(r["groups"].items()):
            cal = g.get("calibrated") or {}
            calibrated = (
                "n/a" if not cal else f"{fmt(cal['specificity_mean'])} ± {fmt(cal['specificity_sd'])} ({cal['k']})"
            )
            auc = f"{fmt(g.get('auc'))} [{fmt(g.get('auc_ci_low'))}, {fmt(g.get('auc_ci_high'))}]"
            first = i == 0
            lines.append(
                f"| {r['recipe'] if first else ''} | {group} | {auc if g.get('auc') is not None else g.get('note')} | "
                f"{fmt(g.get('shortcut_auc'))} | {fmt(g.get('margin'))} | {fmt(g.get('specificity'))} | {calibrated} | "
                + (
                    f"{fmt(r['loco_auc_mean'])} / {fmt(r['loco_auc_worst'])} | {r['minutes']:.1f} |"
                    if first
                    else " | |"
                )
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(REMEDIES), help="recipes to run (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds of the 5 split folds per group (2 = quicker)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "remedies")
    parser.add_argument("--tiny", action="store_true", help="the default recipe, smoke experiment, 2 folds")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every recipe, e.g. paths.curated=DIR")
    args = parser.parse_args(argv)
    if args.tiny:
        args.only, args.folds = ["default"], 2
        small = ["evaluate.bootstrap=20", "loco.calibration.k=6", "loco.calibration.draws=3"]
        small += ["loco.calibration.target_sensitivity=0.5", "loco.calibration.confidence=0.8"]  # 3 positives show it
        args.overrides = ["experiment=smoke", *small, *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or list(REMEDIES):
        rows.append(run_one(name, REMEDIES[name] + args.overrides, args.out, args.folds))
        (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
        print(table(rows), file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
