"""Input pipeline throughput: a training epoch through the real tf.data pipeline (inputs.py: shuffled
indices -> batch -> gather from the in-memory uint8 store -> float -> [augment] -> prefetch)
against the same model's train step fed batches that already sit in memory as float tensors.

Headline (target: ratio >= 0.90): model.fit epochs with the training's compiled train step
(train.steps_per_execution included) on
  pipeline   make_dataset(...) exactly as fitting.Trainer builds it
  in_memory  the same batches, materialized once as float32 tensors (a (steps, B, S, S, 1) tensor
             sliced per step: no gather, cast, shuffle or augmentation work left)
Also reported: a Python loop calling one tf.function train step per batch, fed by iterating the
pipeline vs a list of in-memory batch tensors (this adds the eager per-step iterator cost, which
model.fit avoids by iterating inside the compiled graph).

The sides take turns epoch by epoch (median of --repeats), so machine load affects both alike.
augment none is equal work; with --augment the pipeline side also transforms every image, which
on a 2-core CPU competes with the training step for the same cores.

    .venv/bin/python benchmarks/bench_input_pipeline.py                    # the default model
    .venv/bin/python benchmarks/bench_input_pipeline.py --augment tutorial
    .venv/bin/python benchmarks/bench_input_pipeline.py model=vgg16 model.weights=none --images 96
    .venv/bin/python benchmarks/bench_input_pipeline.py --tiny     # seconds: what make test runs
"""

from __future__ import annotations

import argparse
import json

from common import alternating, images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the project default)")
    parser.add_argument("--images", type=int, default=424, help="images per epoch (a CV fold's training set)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: data.image_size)")
    parser.add_argument("--augment", default="none", help="augment group option for the pipeline side")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--curated", default=None, help="a curated store to take images from")
    parser.add_argument("--tiny", action="store_true", help="the smoke model, 16 images, 1 round (a smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.repeats, args.overrides = 16, 1, ["experiment=smoke", *args.overrides]

    import keras
    import numpy as np
    import tensorflow as tf

    from covidxray.networks import builders
    from covidxray.infra.config import compose
    from covidxray.settings.train import fit_settings
    from covidxray.training.trainer import compile_model, make_optimizer
    from covidxray.training.inputs import build_augmenter, class_weights, make_dataset

    fit = fit_settings(
        compose([*args.overrides, f"augment={args.augment}"] + ([f"data.image_size={args.size}"] if args.size else []))
    )
    size, batch = fit.image_size, fit.batch_size
    x, y, source = images(size, args.images, args.curated)
    x, y = x[: len(x) // batch * batch], y[: len(x) // batch * batch]  # whole batches on both sides
    steps = len(x) // batch
    onehot = np.eye(2, dtype=np.float32)[y]
    w = class_weights(y, 2, fit.class_weights)
    keras.utils.set_random_seed(0)
    model = builders.build_model(fit.model.as_config(), size, 2)
    spe = fit.steps_per_execution
    compile_model(model, make_optimizer(fit.optimizer, fit.optimizer.lr, 10, steps), 2, spe)

    pipeline = make_dataset(x, onehot, w, batch, shuffle=True, seed=0, augmenter=build_augmenter(fit.augment, 0))
    batches = [tuple(tf.identity(t) for t in b) for b in make_dataset(x, onehot, w, batch, shuffle=True, seed=0)]
    stacked = tuple(tf.stack([b[i] for b in batches]) for i in range(3))
    in_memory = tf.data.Dataset.from_tensor_slices(stacked)

    loss_fn = keras.losses.CategoricalCrossentropy()
    optimizer = model.optimizer

    @tf.function(reduce_retracing=True)
    def step(xb, yb, wb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True), sample_weight=wb)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def loop(source_batches):
        def epoch():
            for xb, yb, wb in source_batches:
                loss = step(xb, yb, wb)
            float(loss)

        return epoch

    timing = alternating(
        {
            "fit_in_memory": lambda: model.fit(in_memory, epochs=1, verbose=0, shuffle=False),
            "fit_pipeline": lambda: model.fit(pipeline, epochs=1, verbose=0, shuffle=False),
            "loop_in_memory": loop(batches),
            "loop_pipeline": loop(pipeline),
        },
        args.repeats,
    )
    results = {
        "model": fit.model.name,
        "image_size": size,
        "batch_size": batch,
        "images": len(x),
        "steps_per_execution": spe,
        "augment": args.augment,
        "source": source,
        "repeats": args.repeats,
    }
    for name, (median, _) in timing.items():
        results[f"{name}_images_per_s"] = len(x) / median
    results["ratio"] = timing["fit_in_memory"][0] / timing["fit_pipeline"][0]
    results["loop_ratio"] = timing["loop_in_memory"][0] / timing["loop_pipeline"][0]
    results["epoch_s"] = {name: [round(t, 3) for t in all_times] for name, (_, all_times) in timing.items()}
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}, indent=2))
    print(
        f"training epoch (model.fit): pipeline {results['fit_pipeline_images_per_s']:.0f} images/s vs "
        f"in-memory tensors {results['fit_in_memory_images_per_s']:.0f} images/s: ratio {results['ratio']:.3f} "
        f"(target >= 0.90); Python step loop: ratio {results['loop_ratio']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()
