"""Start-up time of the commands a user types, with and without the bytecode `make setup` compiles
(issue 23): each command is a real process, timed from start to exit, in two modes, both with
PYTHONDONTWRITEBYTECODE=1 (set on these machines and in many containers):

  no_bytecode  PYTHONPYCACHEPREFIX=<an empty folder>: Python looks for .pyc files only there, finds
               none and (PYTHONDONTWRITEBYTECODE) writes none, so it compiles every module it imports
               from source, every time: what an install that compiles nothing (uv's default, pip
               --no-compile) leaves.
  bytecode     the venv's own __pycache__ folders, as `make setup` compiles them (compileall).

    .venv/bin/python benchmarks/bench_startup.py [--model models/model.keras] [--image X.png] [--repeats 3]
    .venv/bin/python benchmarks/bench_startup.py --tiny   # a 32 px model, one repeat: make test (the
                                                          # tiny run times predict with bytecode only)

Commands: `python -c 'import tensorflow'`, `covidxray --help`, `covidxray predict IMAGE --model M`.
--model defaults to the pipeline's models/model.keras; where there is none, an untrained
EfficientNet-Lite0 at 224 px (the default's architecture and size, random weights: start-up does not
depend on the weights) is saved in a temporary folder. --image defaults to a synthetic 256 px PNG.
Each round runs every command in each mode in turn (one untimed warm-up round first, for the OS
file cache), so drifting load on a shared machine hits both modes alike. Reported: median and all
wall seconds per command and mode, the CPU (lscpu), os.cpu_count(), load average before and after,
and how many .pyc files the venv's TensorFlow has (0: `make setup` did not compile, both modes are
then alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_model

MODES = ("no_bytecode", "bytecode")


def command_argv(image: Path, model: Path) -> dict[str, list[str]]:
    """The timed commands; `covidxray` as the venv's console script where there is one."""
    script = Path(sys.executable).with_name("covidxray")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "covidxray.cli"]
    return {
        "import_tensorflow": [sys.executable, "-c", "import tensorflow"],
        "covidxray_help": [*cli, "--help"],
        "predict_one_image": [*cli, "predict", str(image), "--model", str(model)],
    }


def mode_env(mode: str, empty: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "PYTHONPYCACHEPREFIX"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    if mode == "no_bytecode":
        env["PYTHONPYCACHEPREFIX"] = str(empty)
    return env


def wall(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from start to exit of one process; its failure stops the benchmark with its output."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def make_model(folder: Path, tiny: bool) -> Path:
    """A saved model predict can load: the default's architecture at 224 px (random weights), or
    the smoke experiment's small CNN at 32 px (--tiny)."""
    from covidxray.infra.config import compose
    from covidxray.networks import model_file
    from covidxray.networks.builders import build_model

    overrides = ["experiment=smoke"] if tiny else ["model.weights=none"]
    cfg = compose(overrides)
    size = int(cfg.data.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    path = model_file.save(build_model(cfg.model, size, 2), folder / model_file.MODEL_FILE)
    meta = {"classes": ["normal", "covid"], "image_size": size, "threshold": 0.5, "model": str(cfg.model.name)}
    (folder / model_file.META_FILE).write_text(json.dumps(meta))
    return path


def make_image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).normal(110, 40, size=(256, 256)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tensorflow_pyc_count() -> int:
    """.pyc files in the venv's TensorFlow package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return 0
    return sum(1 for _ in Path(next(iter(spec.submodule_search_locations))).rglob("*.pyc"))


def measure(commands: dict[str, list[str]], modes: dict[str, tuple], repeats: int, warm_up: bool, work: Path) -> dict:
    """Per command and mode (modes[name]): the median and all wall seconds over `repeats` rounds."""
    empty = work / "empty-pycache-prefix"
    empty.mkdir()
    times: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in modes[name]} for name in commands}
    for round_ in range(repeats + int(warm_up)):
        for name, argv in commands.items():
            for mode in modes[name]:
                seconds = wall(argv, mode_env(mode, empty), work)
                if round_ >= int(warm_up):
                    times[name][mode].append(round(seconds, 2))
    assert not any(empty.iterdir()), "Python wrote bytecode although PYTHONDONTWRITEBYTECODE=1"
    return {
        name: {mode: {"median_s": round(statistics.median(t), 2), "times_s": t} for mode, t in by_mode.items()}
        for name, by_mode in times.items()
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "model.keras"), help="a trained model.keras")
    parser.add_argument("--image", default=None, help="the image predict reads (default: a synthetic PNG)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 32 px model, one repeat, no warm-up, predict with bytecode only (make test)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        model = Path(args.model)
        made = args.tiny or not model.is_file()
        if made:
            model = make_model(work / "model", args.tiny)
        image = Path(args.image) if args.image else make_image(work / "xray.png")
        commands = command_argv(image.resolve(), model.resolve())
        modes = {name: MODES for name in commands}
        if args.tiny:  # make test: every path runs once, the slow predict-from-source is left out
            commands.pop("import_tensorflow")
            modes["predict_one_image"] = ("bytecode",)
        load_before = os.getloadavg()
        results = measure(commands, modes, 1 if args.tiny else args.repeats, not args.tiny, work)
        report = {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "model": "synthetic (untrained, saved by the benchmark)" if made else str(model),
            "tensorflow_pyc_files": tensorflow_pyc_count(),
            "results": results,
        }
    print(json.dumps(report, indent=2))
    for name, by_mode in results.items():
        said = ", ".join(f"{by_mode[mode]['median_s']:.2f} s {mode}" for mode in by_mode)
        print(f"{name}: {said} (median of {len(by_mode['bytecode']['times_s'])})")
    return report


if __name__ == "__main__":
    main()
