"""Frozen EfficientNet-Lite0 feature extraction: images/s at 224 px, the way train.py's
frozen-feature cache runs it (preprocess + backbone in inference mode over a tf.data pipeline of
uint8 images, batches of train.EVAL_BATCH), and the projected time for 3,000 images (target: under
3 minutes on the 2-core CPU). Other backbones can run alongside, taking turns within each round so
that machine load affects all alike.

    .venv/bin/python benchmarks/bench_lite0_features.py [--images 256] [--size 224] [--repeats 3]
        [--also mobilenetv2 efficientnetb0]

Weights do not change the timing: the converted ImageNet file is used when the pretrained stage has
written it, else random weights (weights=none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import REPO, alternating, images

TARGET_IMAGES = 3000


def extractor(name: str, size: int):
    """preprocess + backbone of the project's model for `name`, as Trainer.features builds it."""
    import keras

    from covidxray.modeling import efficientnet_lite, models

    converted = REPO / "models" / "pretrained" / efficientnet_lite.WEIGHTS_FILE
    weights = "imagenet" if name == "efficientnet_lite0" and converted.is_file() else "none"
    cfg = {
        "name": name,
        "weights": weights,
        "imagenet_file": str(converted),
        "freeze_base": True,
        "head": {"pool_size": 7, "dense_units": 64, "dropout": 0.5},
    }
    model = models.build_model(cfg, size, 2)
    preprocess, backbone, _ = models.split_at_backbone(model)
    inputs = keras.Input(model.input.shape[1:])
    return keras.Model(inputs, backbone(preprocess(inputs), training=False)), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curated", default=None)
    parser.add_argument("--also", nargs="*", default=[], help="other backbones to time alongside")
    args = parser.parse_args()

    import os

    from covidxray.stages.train import EVAL_BATCH, make_dataset

    x, _, source = images(args.size, args.images, args.curated)
    runs, weights, cpu = {}, {}, {}
    for name in ["efficientnet_lite0", *args.also]:
        model, weights[name] = extractor(name, args.size)
        runs[name] = _cpu_timed(
            lambda m=model: m.predict(make_dataset(x, None, None, EVAL_BATCH), verbose=0), cpu.setdefault(name, [])
        )
    timings = alternating(runs, args.repeats)
    cores = min(2, os.cpu_count() or 1)
    results = {
        "image_size": args.size,
        "images": len(x),
        "batch": EVAL_BATCH,
        "source": source,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
    }
    for name, (median, all_s) in timings.items():
        per_s = len(x) / median
        cpu_per_image = statistics.median(cpu[name][1:]) / len(x)  # the timed rounds (not the warm-up)
        results[name] = {
            "weights": weights[name],
            "median_s": round(median, 3),
            "all_s": [round(t, 2) for t in all_s],
            "images_per_s": round(per_s, 1),
            f"projected_{TARGET_IMAGES}_images_s": round(TARGET_IMAGES / per_s, 1),
            # CPU seconds the process spent per image: the load-independent cost; with `cores` free
            # cores and perfect parallelism, 3,000 images would take TARGET * cpu_per_image / cores
            "cpu_s_per_image": round(cpu_per_image, 4),
            f"projected_{TARGET_IMAGES}_images_s_on_{cores}_free_cores": round(
                TARGET_IMAGES * cpu_per_image / cores, 1
            ),
        }
    print(json.dumps(results, indent=2))


def _cpu_timed(fn, record: list):
    """fn, also appending the process CPU time (user + system, all threads) of each call to record."""

    def run():
        start = time.process_time()
        fn()
        record.append(time.process_time() - start)

    return run


if __name__ == "__main__":
    main()
