"""Frozen-feature cache: with a frozen base and no augmentation, fitting.Trainer runs the backbone once
per image and trains only the head on the cached features. Measured side by side against a
faithful re-creation of the tutorial's own loop, which runs the full base forward pass for every
image in every epoch:

  tutorial      ImageDataGenerator(rotation_range=15).flow(float array, batch_size=8) + model.fit,
                the full model (frozen VGG16 base + head), every image every epoch
  tutorial-noaug the same loop without rotation (equal work to the cached run: no augmentation)
  cached        covidxray.training.trainer.Trainer on the tutorial config with augment=none (cache on)

Default: the tutorial config (VGG16 frozen, 224 px, batch 8, lr 1e-3 inverse-time decay) with
weights=none (no ImageNet file offline; weights do not change the timing), 100 images x 3 epochs.

    .venv/bin/python benchmarks/bench_feature_cache.py [--images 100] [--epochs 3] [overrides...]
    .venv/bin/python benchmarks/bench_feature_cache.py --tiny     # seconds: what make test runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--curated", default=None)
    parser.add_argument("--skip-rotation", action="store_true", help="skip the rotating tutorial run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all methods (median reported)")
    parser.add_argument("--tiny", action="store_true", help="8 images at 32 px, 1 epoch, 1 round (a smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.epochs, args.repeats, args.skip_rotation = 8, 1, 1, True
        args.overrides = [*args.overrides, "data.image_size=32"]

    import keras
    import numpy as np

    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
    except ImportError:  # pragma: no cover
        from tensorflow.keras.preprocessing.image import ImageDataGenerator

    from covidxray.networks import builders
    from covidxray.infra.config import compose
    from covidxray.settings.train import fit_settings
    from covidxray.training.trainer import Trainer, compile_model, make_optimizer

    fit = fit_settings(
        compose(
            [
                "experiment=tutorial",
                "model.weights=none",
                "augment=none",
                "train.early_stopping.enabled=false",
                "paths.features=",  # memory only: this compares the in-run cache with the tutorial loop
                f"train.epochs={args.epochs}",
                *args.overrides,
            ]
        )
    )
    size, batch, epochs = fit.image_size, fit.batch_size, fit.epochs
    x, y, source = images(size, args.images, args.curated)
    n = len(x)
    onehot = np.eye(2, dtype=np.float32)[y]
    results = {
        "model": fit.model.name,
        "image_size": size,
        "batch_size": batch,
        "images": n,
        "epochs": epochs,
        "source": source,
    }

    def tutorial(rotation: float) -> float:
        """The tutorial: float array in memory, ImageDataGenerator.flow, model.fit with steps_per_epoch."""
        keras.utils.set_random_seed(0)
        model = builders.build_model(fit.model.as_config(), size, 2)
        compile_model(model, make_optimizer(fit.optimizer, fit.optimizer.lr, epochs, n // batch), 2)
        train_x = x.astype(np.float32)[..., None]
        aug = ImageDataGenerator(rotation_range=rotation, fill_mode="nearest")
        start = time.perf_counter()
        flow = aug.flow(train_x, onehot, batch_size=batch)
        # Every image every epoch, as the cached run: steps_per_epoch = len(flow) = ceil(n / batch).
        # (The tutorial's n // batch makes Keras 3 end epochs early on this legacy iterator.)
        model.fit(flow, steps_per_epoch=len(flow), epochs=epochs, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == epochs * len(flow)
        return time.perf_counter() - start

    def cached() -> float:
        trainer = Trainer(fit, x, y, 2, verbose=0)
        assert trainer.uses_cache
        start = time.perf_counter()
        model = trainer.new_model()
        trainer.fit(model, np.arange(n), None, [epochs, 0])
        return time.perf_counter() - start

    cached()  # warm-up: graph tracing and the first backbone build
    runs = {"cached": cached, "tutorial_noaug": lambda: tutorial(0.0)}
    if not args.skip_rotation:
        runs["tutorial_rotation15"] = lambda: tutorial(15.0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # the methods take turns, so machine load affects all alike
        for name, fn in runs.items():
            times[name].append(fn())
    for name, values in times.items():
        results[f"{name}_s"] = statistics.median(values)
        results[f"{name}_all_s"] = [round(v, 2) for v in values]
    for name in runs:
        if name != "cached":
            results[f"speedup_vs_{name}"] = results[f"{name}_s"] / results["cached_s"]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}, indent=2))
    return results


if __name__ == "__main__":
    main()
