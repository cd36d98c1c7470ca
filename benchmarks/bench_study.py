"""The study stage timed on warm features: algorithms x feature sources through leave-one-collection-out
(stages/study.py: every recipe on the same groups, paired comparisons, reports and MLflow runs), in
this process, as `covidxray study` runs it. The target (issue 22): >= 5 algorithms x 2 feature
sources in <= 5 minutes on the 2-core CPU, the frozen backbone's features already in the store.

    .venv/bin/python benchmarks/bench_study.py                   # erm,groupdro,coral,mixup,vrex x last,blocks
    .venv/bin/python benchmarks/bench_study.py --repeats 3       # the median of 3 studies
    .venv/bin/python benchmarks/bench_study.py --algorithms erm vrex --features last
    .venv/bin/python benchmarks/bench_study.py --tiny            # erm x 2 sources, synthetic 32 px: make test

Each study writes its reports and MLflow runs to a temporary folder; the feature store is
--features (default the repo's data/features: run the study once, or `dvc repro study`, to fill it
for both feature sources; the report gives its hits and misses, so a cold store shows). Reported:
wall seconds per study (the first includes TensorFlow's import and graph tracing: --warm runs one
untimed study first), their median, seconds per recipe (each recipe's LOCO; the first of its data
also reads and prepares the images), the CPU model, os.cpu_count(), load average before and after,
and pass or fail against --target-s (300). On a shared machine, read the load average beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench_head_sweep import TINY_SETTINGS, tiny_store
from common import REPO, cpu_model

ALGORITHMS = ["erm", "groupdro", "coral", "mixup", "vrex"]
FEATURES = ["last", "blocks"]
TINY_LOCO = [  # K = 6 supports sensitivity 0.5 at confidence 0.8 (tests/test_study.py's)
    "loco.calibration.k=6",
    "loco.calibration.draws=5",
    "loco.calibration.target_sensitivity=0.5",
    "loco.calibration.confidence=0.8",
    "loco.objective.min_images=4",
    "evaluate.bootstrap=50",
]
RECIPE_LINE = re.compile(r"study: recipe (\S+) done in ([0-9.]+)s")
STORE_LINE = re.compile(r"features \(train\): .*: (\d+) hits, (\d+) misses")


def recipes(algorithms: list[str], features: list[str]) -> list[dict]:
    """One recipe per (algorithm, feature source): erm first (the baseline), names like vrex_blocks."""
    return [
        {"name": a if f == "last" else f"{a}_{f}", "overrides": [f"algorithm={a}", f"model.features={f}"]}
        for f in features
        for a in algorithms
    ]


def one_study(overrides: list[str], found: list[dict], work: Path) -> dict:
    """Compose the configuration, run the study stage into `work`; wall seconds, and from the stage's
    lines the seconds per recipe and the feature store's hits and misses."""
    from omegaconf import OmegaConf

    from covidxray.infra.config import compose
    from covidxray.stages import study

    cfg = compose([*overrides, f"paths.reports={work / 'reports'}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db"])
    cfg.study.recipes = OmegaConf.create(found)
    cfg.study.baseline = found[0]["name"]
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        study.main(cfg)
    wall = time.perf_counter() - start
    counts = [tuple(map(int, m.groups())) for m in STORE_LINE.finditer(out.getvalue())]
    hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
    seconds = {m[1]: float(m[2]) for m in RECIPE_LINE.finditer(out.getvalue())}
    return {"wall_s": round(wall, 1), "per_recipe_s": seconds, "store_hits": hits, "store_misses": misses}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=None, help=f"default {' '.join(ALGORITHMS)}")
    parser.add_argument("--features", nargs="+", default=None, help=f"feature sources, default {' '.join(FEATURES)}")
    parser.add_argument("--store", default=str(REPO / "data" / "features"), help="the feature store")
    parser.add_argument("--curated", default=str(REPO / "data" / "curated"))
    parser.add_argument("--splits", default=str(REPO / "data" / "splits.csv"))
    parser.add_argument("--pretrained", default=str(REPO / "models" / "pretrained"), help="paths.pretrained")
    parser.add_argument("--repeats", type=int, default=1, help="timed studies (the median is reported)")
    parser.add_argument("--warm", action="store_true", help="one untimed study first (imports, graph tracing)")
    parser.add_argument("--target-s", type=float, default=300.0)
    parser.add_argument("--tiny", action="store_true", help="erm x last, blocks on synthetic 32 px data")
    args = parser.parse_args(argv)

    algorithms = args.algorithms or (["erm"] if args.tiny else ALGORITHMS)
    found = recipes(algorithms, args.features or FEATURES)
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        work = Path(tmp)
        if args.tiny:
            curated, splits = tiny_store(work / "data", n=16)
            store, settings = work / "features", [*TINY_SETTINGS, *TINY_LOCO]
        else:
            curated, splits, store, settings = Path(args.curated), Path(args.splits), Path(args.store), []
            if not (curated / "images.npy").is_file() or not splits.is_file():
                parser.error(f"no curated store at {curated} or splits at {splits}: `dvc repro split`, or --tiny")
        overrides = [
            *settings,
            f"paths.curated={curated.resolve()}",
            f"paths.splits={splits.resolve()}",
            f"paths.features={store.resolve()}",
            f"paths.pretrained={Path(args.pretrained).resolve()}",
        ]
        load_before = os.getloadavg()
        warm = one_study(overrides, found, work / "warm") if args.warm else None
        runs = [one_study(overrides, found, work / f"run{i}") for i in range(args.repeats)]
    median = statistics.median(r["wall_s"] for r in runs)
    results = {
        "recipes": [r["name"] for r in found],
        "settings": settings,
        "studies_s": [r["wall_s"] for r in runs],
        "median_s": median,
        "median_per_recipe_s": round(median / len(found), 1),
        "target_s": args.target_s,
        "pass": median <= args.target_s,
        "store": str(store.resolve()),
        "store_warm": all(r["store_misses"] == 0 and r["store_hits"] > 0 for r in runs),
        "warm_study_s": None if warm is None else warm["wall_s"],
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "runs": runs,
    }
    print(json.dumps(results, indent=2))
    per_recipe = results["median_per_recipe_s"]
    print(
        f"study: {len(found)} recipes in {median} s (median of {len(runs)}; {per_recipe} s/recipe), "
        f"store {'warm' if results['store_warm'] else 'cold'}: {'PASS' if results['pass'] else 'FAIL'} vs "
        f"{args.target_s:.0f} s on {results['cpu']} x{results['cpus']}, load {results['load_average_1_5_15_after']}"
    )
    return results


if __name__ == "__main__":
    main()
