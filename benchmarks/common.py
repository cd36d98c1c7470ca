"""Shared by the benchmarks: images to time on, the CPU model, and a median-of-repeats timer."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def images(size: int, n: int, curated: str | None = None, seed: int = 0):
    """n uint8 (size, size) images and 0/1 labels: the curated store when it holds that size (the
    real X-rays), else synthetic noise (timing does not depend on the pixels)."""
    import numpy as np

    from covidxray.data.images import load_curated

    for path in [curated, REPO / "data" / "curated"]:
        if path and (Path(path) / "images.npy").is_file():
            x, index, classes = load_curated(Path(path), mmap=True)
            if x.shape[1] == size and len(x) >= n:
                pick = np.random.default_rng(seed).permutation(len(x))[:n]
                return np.ascontiguousarray(x[pick]), index["y"].to_numpy()[pick].astype(int) % 2, str(path)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8), rng.integers(0, 2, n), "synthetic"


def cpu_model() -> str:
    """lscpu's "Model name" (the CPU the times were measured on)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of fn() over `repeats` calls (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def alternating(fns: dict, repeats: int) -> dict[str, tuple[float, list[float]]]:
    """Median wall seconds of each fn over `repeats` rounds, the fns taking turns within each round
    (after one untimed warm-up call each), so drifting machine load affects all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t) for name, t in times.items()}
