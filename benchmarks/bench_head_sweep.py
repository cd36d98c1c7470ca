"""A head sweep over cached features, timed as a user runs it: one Hydra multirun of the train
stage (`covidxray train -m ...`, a real process) over the head's hyperparameters, with the frozen
default backbone (EfficientNet-Lite0), so every point reads the feature store. The target
(issue 16): 12 points in under 2 minutes.

    .venv/bin/python benchmarks/bench_head_sweep.py [--features DIR] [--curated DIR] [--splits CSV]
    .venv/bin/python benchmarks/bench_head_sweep.py --overrides optimizer.lr=1e-3,1e-4 model.head.dropout=0.2,0.5
    .venv/bin/python benchmarks/bench_head_sweep.py --points 4  # 4 learning rates instead of the grid
    .venv/bin/python benchmarks/bench_head_sweep.py --tiny      # 2 points, synthetic 32 px, cold store: make test

The default grid is optimizer.lr=1e-3,3e-4,1e-4 x model.head.dropout=0.2,0.5 x
train.class_weights=balanced,none (12 points), with cv.final_model=false (--final-model keeps the
final refit). MLflow, the sweep folders and the process's working directory are in a temporary
folder (--keep-dir to keep them elsewhere), so nothing lands in the repository; the feature store is
--features (default the repo's paths.features, data/features). With --warm (the default) one
untimed job of the first point runs first, so the timed sweep finds the store filled; the report
says whether it did (the stage's "feature store ...: N hits, M misses" lines).

Reported: total wall seconds (process start to exit), seconds to Hydra's first job line (the
first job includes the stage's imports: TensorFlow), seconds per point (between Hydra's "#k : ..."
job lines; the last to the process's exit), each point's figure from its reports/cv/metrics.json
(--metric, default cv_auc_mean), feature-store hits and misses, the CPU model (lscpu),
os.cpu_count(), load average before and after, and pass or fail against --target-s (120). On a
shared machine, read the load average beside the times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_model

DEFAULT_GRID = ["optimizer.lr=1e-3,3e-4,1e-4", "model.head.dropout=0.2,0.5", "train.class_weights=balanced,none"]
TINY_GRID = ["optimizer.lr=1e-3,3e-4"]
# Tiny: the smoke CNN frozen with random weights at 32 px (still a frozen backbone read through the
# feature store; Lite0 there made each tiny run ~3x as long), one epoch, as cheap as make test can afford.
TINY_SETTINGS = [
    "data.image_size=32",
    "data.crop_border=0.0",
    "model=small_cnn",
    "model.filters=[4,8]",
    "model.freeze_base=true",
    "model.weights=none",
    "train.run_eagerly=true",
    "model.head.pool_size=1",
    "model.head.dense_units=8",
    "train.epochs=1",
    "train.early_stopping.enabled=false",
]
JOB_LINE = re.compile(r"#(\d+) : (.*)$")
STORE_LINE = re.compile(r"feature store .*: (\d+) hits?, (\d+) miss")  # the stage's total per job


def points(grid: list[str]) -> int:
    """How many jobs Hydra's basic sweeper makes of `grid` (the product of the comma lists)."""
    return len(list(itertools.product(*(override.split("=", 1)[1].split(",") for override in grid))))


def first_point(grid: list[str]) -> list[str]:
    return [f"{key}={values.split(',')[0]}" for key, values in (override.split("=", 1) for override in grid)]


def tiny_store(root: Path, n: int = 12, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """A synthetic curated store and splits (2 folds) in the default collections' roles: n covid
    (ieee8023) and n normal (kermany) images, and n/3 of each from radiography (external)."""
    import numpy as np
    import pandas as pd

    from covidxray.data.images import save_curated
    from covidxray.stages.split import make_splits

    rng = np.random.default_rng(seed)
    classes, rows, arrays = ["normal", "covid"], [], []
    for collections, count in ((("kermany", "ieee8023"), n), (("radiography", "radiography"), max(2, n // 3))):
        for y, label in enumerate(classes):
            arrays.append(rng.normal(90 + 60 * y, 25, size=(count, size, size)).clip(0, 255).astype(np.uint8))
            for i in range(count):
                name = f"{collections[y]}-{label}-{i:03d}"
                rows.append(
                    dict(image_id=name, label=label, y=y, patient_id=f"{name}-p", source=collections[y])
                    | dict(dup_group=name, orig_width=size, orig_height=size, orig_format="PNG", orig_mode="L")
                )
    index = pd.DataFrame(rows)
    save_curated(root / "curated", np.concatenate(arrays), index, classes)
    make_splits(index, test_fraction=0.25, folds=2, seed=seed).to_csv(root / "splits.csv", index=False)
    return root / "curated", root / "splits.csv"


def sweep(overrides: list[str], work: Path, name: str) -> dict:
    """Run `covidxray train -m <overrides>` in `work` (its MLflow store and sweep folder there);
    every output line time-stamped as it arrives. Returns the lines, times and exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    sweep_dir = work / name
    argv = [
        sys.executable,
        "-m",
        "covidxray.cli",
        "train",
        "-m",
        *overrides,
        f"mlflow.tracking_uri=sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with subprocess.Popen(
        argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
        rc = proc.wait()
    return {"rc": rc, "wall_s": time.perf_counter() - start, "lines": lines, "dir": sweep_dir, "argv": argv}


def store_counts(lines: list[tuple[float, str]]) -> tuple[int, int]:
    found = [STORE_LINE.search(text) for _, text in lines]
    return sum(int(m[1]) for m in found if m), sum(int(m[2]) for m in found if m)


def per_point(run: dict, metric: str, keys: set[str]) -> list[dict]:
    """One row per job: its overrides of `keys`, seconds from its launch line to the next (the last: to the
    process's exit), its feature-store hits and misses, and `metric` from its metrics.json."""
    starts = [(t, int(m[1]), m[2]) for t, text in run["lines"] if (m := JOB_LINE.search(text))]
    rows = []
    for i, (t, job, overrides) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else run["wall_s"]
        hits, misses = store_counts([(s, text) for s, text in run["lines"] if t <= s < end])
        metrics = run["dir"] / str(job) / "reports" / "cv" / "metrics.json"
        value = json.loads(metrics.read_text()).get(metric) if metrics.is_file() else None
        swept = " ".join(o for o in overrides.split() if o.split("=", 1)[0] in keys)
        rows.append(
            {"job": job, "overrides": swept, "seconds": round(end - t, 1)}
            | {"hits": hits, "misses": misses, metric: value}
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", nargs="+", default=None, help="the sweep's comma-list overrides")
    parser.add_argument("--points", type=int, default=None, help="instead of the grid: N values of optimizer.lr")
    parser.add_argument("--features", default=str(REPO / "data" / "features"), help="the feature store")
    parser.add_argument("--curated", default=str(REPO / "data" / "curated"))
    parser.add_argument("--splits", default=str(REPO / "data" / "splits.csv"))
    parser.add_argument("--pretrained", default=str(REPO / "models" / "pretrained"), help="paths.pretrained")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every job (not swept)")
    parser.add_argument("--final-model", action="store_true", help="keep cv.final_model (refit on all CV data)")
    parser.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="an untimed job first (default: on, --tiny: off)",
    )
    parser.add_argument("--metric", default="cv_auc_mean", help="the figure read from each job's metrics.json")
    parser.add_argument("--target-s", type=float, default=120.0)
    parser.add_argument("--keep-dir", default=None, help="work here (MLflow, sweep folders) and keep it")
    parser.add_argument("--tiny", action="store_true", help="2 points on synthetic 32 px data (a smoke test)")
    args = parser.parse_args(argv)

    args.warm = not args.tiny if args.warm is None else args.warm
    grid = args.overrides or (TINY_GRID if args.tiny else DEFAULT_GRID)
    if args.points and not args.overrides:  # one axis: N learning rates, log-spaced from 3e-3 to 3e-5
        lrs = [3e-3 * 0.01 ** (i / max(1, args.points - 1)) for i in range(args.points)]
        grid = ["optimizer.lr=" + ",".join(f"{lr:.3g}" for lr in lrs)]
    with tempfile.TemporaryDirectory(prefix="bench-head-sweep-") as tmp:
        work = Path(args.keep_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        settings = [] if args.final_model else ["cv.final_model=false"]
        if args.tiny:
            curated, splits = tiny_store(work / "data")
            features = work / "features"
            settings += TINY_SETTINGS
        else:
            curated, splits, features = Path(args.curated), Path(args.splits), Path(args.features)
            if not (curated / "images.npy").is_file() or not splits.is_file():
                parser.error(f"no curated store at {curated} or splits at {splits}: `dvc repro split`, or --tiny")
        settings += [
            f"paths.curated={Path(curated).resolve()}",
            f"paths.splits={Path(splits).resolve()}",
            f"paths.features={Path(features).resolve()}",
            f"paths.pretrained={Path(args.pretrained).resolve()}",
            *args.extra,
        ]
        load_before = os.getloadavg()
        warm = sweep(first_point(grid) + settings, work, "warm") if args.warm else None
        if warm is not None and warm["rc"] != 0:
            sys.exit("warm-up job failed:\n" + "\n".join(text for _, text in warm["lines"][-40:]))
        timed = sweep(grid + settings, work, "sweep")
        if timed["rc"] != 0:
            sys.exit("sweep failed:\n" + "\n".join(text for _, text in timed["lines"][-40:]))
        rows = per_point(timed, args.metric, {override.split("=", 1)[0] for override in grid})
        hits, misses = store_counts(timed["lines"])
        launch = next((t for t, text in timed["lines"] if JOB_LINE.search(text)), None)
        results = {
            "grid": grid,
            "settings": settings,
            "points": len(rows),
            "points_expected": points(grid),
            "total_wall_s": round(timed["wall_s"], 1),
            "to_first_job_s": None if launch is None else round(launch, 1),  # the first job includes the imports
            "seconds_per_point": round(sum(r["seconds"] for r in rows) / max(1, len(rows)), 1),
            "target_s": args.target_s,
            "pass": timed["wall_s"] < args.target_s and len(rows) == points(grid),
            "store": str(Path(features).resolve()),
            "store_hits": hits,
            "store_misses": misses,
            "store_warm": misses == 0 and hits > 0,
            "warm_job": None
            if warm is None
            else {"wall_s": round(warm["wall_s"], 1), **dict(zip(("hits", "misses"), store_counts(warm["lines"])))},
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_average_1_5_15_before": [round(v, 2) for v in load_before],
            "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
            "per_point": rows,
            "work_dir": str(work) if args.keep_dir else None,
        }
    print(json.dumps(results, indent=2))
    print(
        f"head sweep: {results['points']} points in {results['total_wall_s']} s "
        f"({results['seconds_per_point']} s/point, first job at {results['to_first_job_s']} s), store "
        f"{'warm' if results['store_warm'] else 'cold'} ({hits} hits, {misses} misses): "
        f"{'PASS' if results['pass'] else 'FAIL'} vs {args.target_s:.0f} s on {results['cpu']} "
        f"x{results['cpus']}, load {results['load_average_1_5_15_after']}"
    )
    return results


if __name__ == "__main__":
    main()
