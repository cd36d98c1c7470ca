"""Frozen EfficientNet-Lite0 feature extraction at 224 px: images/s of today's path beside the fast
ones, in one run (the engines take turns within each round, so machine load affects all alike),
with the largest difference in features from the Keras path.

  keras      the extractor's predict over the tf.data pipeline, batches of fitting.EVAL_BATCH
             (what train did before the feature store; extraction.run_keras)
  keras_xla  the same with jit_compile=True (XLA on CPU)
  tflite     the extractor converted by TensorFlow's TFLite converter, run by the TFLite
             interpreter of the TensorFlow wheel with its XNNPACK delegate (extraction.run_tflite,
             what the feature store uses), at --tflite-batch images per call

    .venv/bin/python benchmarks/bench_lite0_features.py [--images 256] [--size 224] [--repeats 3]
    .venv/bin/python benchmarks/bench_lite0_features.py --tiny      # seconds: what make test runs

Weights do not change the timing: the converted ImageNet file is used when the pretrained stage has
written it, else random weights (weights=none). The CPU model (lscpu) and load average are reported:
on a shared machine, compare the ratio, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from common import REPO, alternating, cpu_model, images

TARGET_IMAGES = 3000


def extractor(name: str, size: int):
    """preprocess + backbone of the project's model for `name` (extraction.feature_extractor)."""
    from covidxray.networks import efficientnet_lite
    from covidxray.training import extraction
    from covidxray.networks import builders

    converted = REPO / "models" / "pretrained" / efficientnet_lite.WEIGHTS_FILE
    weights = "imagenet" if name == "efficientnet_lite0" and converted.is_file() else "none"
    cfg = {
        "name": name,
        "weights": weights,
        "imagenet_file": str(converted),
        "freeze_base": True,
        "head": {"pool_size": 7, "dense_units": 64, "dropout": 0.5},
    }
    return extraction.feature_extractor(builders.build_model(cfg, size, 2)), weights


def engines(model, tflite_batches: list[int], threads: int | None, xla: bool = True):
    """{engine name: fn(x) -> features}; the TFLite file is converted once here (timed apart)."""
    import keras

    from covidxray.training import extraction
    from covidxray.training.trainer import EVAL_BATCH

    start = time.perf_counter()
    blob = extraction.convert_tflite(model)
    convert_s = time.perf_counter() - start
    fns = {"keras": lambda x: extraction.run_keras(model, x, EVAL_BATCH)}
    if xla:
        jit = keras.Model(model.inputs, model.outputs)
        jit.compile(jit_compile=True)
        fns["keras_xla"] = lambda x: extraction.run_keras(jit, x, EVAL_BATCH)
    for b in tflite_batches:
        fns[f"tflite_b{b}"] = lambda x, b=b: extraction.run_tflite(blob, x, batch=b, threads=threads)
    return fns, convert_s, len(blob)


def per_engine(timings: dict, cpu: dict, outputs: dict, n: int) -> dict:
    """Per engine: wall median, images/s and the ratio to keras, CPU seconds per image, and the
    largest difference of its features from keras's."""
    cores, base, out = min(2, os.cpu_count() or 1), timings["keras"][0], {}
    for name, (median, all_s) in timings.items():
        cpu_s = statistics.median(cpu[name][1:] or cpu[name])  # the timed rounds, not the warm-up
        out[name] = {
            "median_s": round(median, 3),
            "all_s": [round(t, 2) for t in all_s],
            "images_per_s": round(n / median, 1),
            "speedup_vs_keras": round(base / median, 2),
            # CPU seconds (all threads) per image: the load-independent cost; what `cores` free cores
            # would give with the engine keeping them all busy
            "cpu_s_per_image": round(cpu_s / n, 4),
            f"images_per_s_on_{cores}_free_cores": round(cores * n / cpu_s, 1),
            "max_abs_diff_vs_keras": float(np.abs(outputs[name] - outputs["keras"]).max()),
            f"projected_{TARGET_IMAGES}_images_s": round(TARGET_IMAGES * median / n, 1),
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curated", default=None)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--tflite-batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="TFLite threads (default: the CPUs allowed)")
    parser.add_argument("--no-xla", action="store_true", help="leave out keras_xla (its compile takes a while)")
    parser.add_argument("--tiny", action="store_true", help="8 images at 32 px, one round, no XLA (a smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.size, args.repeats, args.tflite_batch, args.no_xla = 8, 32, 1, [4], True

    x, _, source = images(args.size, args.images, args.curated)
    model, weights = extractor(args.model, args.size)
    fns, convert_s, blob_bytes = engines(model, args.tflite_batch, args.threads, xla=not args.no_xla)
    outputs = {name: fn(x) for name, fn in fns.items()}  # also the warm-up round
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def cpu_timed(name, fn):
        def run():
            start = time.process_time()
            fn(x)
            cpu[name].append(time.process_time() - start)

        return run

    timings = alternating({name: cpu_timed(name, fn) for name, fn in fns.items()}, args.repeats)
    results = {
        "model": args.model,
        "weights": weights,
        "image_size": args.size,
        "images": len(x),
        "source": source,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "repeats": args.repeats,
        "tflite_convert_s (once per key, kept in the feature store)": round(convert_s, 1),
        "tflite_bytes": blob_bytes,
        "feature_abs_max": float(np.abs(outputs["keras"]).max()),
        **per_engine(timings, cpu, outputs, len(x)),
    }
    print(json.dumps(results, indent=2))
    print(
        "images/s: "
        + ", ".join(f"{n} {results[n]['images_per_s']} (x{results[n]['speedup_vs_keras']})" for n in timings)
        + f" on {results['cpu']}, load {results['load_average_1_5_15']}"
    )
    return results


if __name__ == "__main__":
    main()
