"""The training input pipeline: a tf.data pipeline over the in-memory images, with augmentation
layers (Keras's, and one fused affine warp of our own) applied on the fly to training batches.

TensorFlow is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math

import numpy as np

from covidxray.training.specs import AugmentSettings


def random_affine_layer():
    """RandomAffine: rotation, translation and zoom drawn per image and applied as ONE projective
    warp (bilinear, nearest fill), instead of one warp per Keras layer: the same kinds of change
    at a third of the resampling cost (each warp costs as much as a small CNN's training step on
    a 2-core CPU)."""
    import keras
    import tensorflow as tf

    class RandomAffine(keras.layers.Layer):
        def __init__(self, rotation_deg=0.0, shift=0.0, zoom=0.0, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.rotation = float(rotation_deg) * math.pi / 180.0
            self.shift, self.zoom, self.seed = float(shift), float(zoom), seed

        def call(self, images, training=True):
            if not training:
                return images
            shape = tf.shape(images)
            n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

            def uniform(limit, offset):
                seed = None if self.seed is None else self.seed + offset
                return tf.random.uniform([n], -limit, limit, seed=seed)

            theta = uniform(self.rotation, 0)
            scale = 1.0 / (1.0 + uniform(self.zoom, 1))  # output -> input: > 1 shows more (zoom out)
            tx, ty = uniform(self.shift, 2) * w, uniform(self.shift, 3) * h
            cos, sin = tf.cos(theta) * scale, tf.sin(theta) * scale
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            # input point = A (output point - centre) + centre + shift, A = scale * rotation(theta)
            transforms = tf.stack(
                [
                    cos,
                    -sin,
                    cx - cos * cx + sin * cy + tx,
                    sin,
                    cos,
                    cy - sin * cx - cos * cy + ty,
                    tf.zeros([n]),
                    tf.zeros([n]),
                ],
                axis=1,
            )
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=images,
                transforms=transforms,
                output_shape=shape[1:3],
                fill_value=0.0,
                interpolation="BILINEAR",
                fill_mode="NEAREST",
            )

        def compute_output_shape(self, input_shape):
            return input_shape

    return RandomAffine


def build_augmenter(aug: AugmentSettings, seed: int):
    """Augmentation layers for aug.name (None for none); they run in the tf.data map, on the
    fly, for training batches only. Fill mode "nearest", as ImageDataGenerator's.

    tutorial: Keras RandomRotation (the tutorial's rotation_range). standard: one fused
    RandomAffine warp (rotation + shift + zoom), then Keras RandomBrightness and RandomContrast."""
    import keras
    from keras import layers

    if aug.name == "none":
        return None
    rotation = float(aug.rotation_deg)
    steps = []
    if aug.name == "tutorial" and rotation > 0:
        steps.append(layers.RandomRotation(rotation / 360.0, fill_mode="nearest", seed=seed, name="rotation"))
    if aug.name == "standard":
        if rotation > 0 or aug.shift > 0 or aug.zoom > 0:
            steps.append(random_affine_layer()(rotation, aug.shift, aug.zoom, seed=seed, name="affine"))
        if aug.brightness > 0:
            steps.append(
                layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed + 3, name="brightness")
            )
        if aug.contrast > 0:
            steps.append(layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed + 4, name="contrast"))
    if aug.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5, name="flip"))
    return keras.Sequential(steps, name="augment") if steps else None


def make_dataset(
    x: np.ndarray,
    y_onehot: np.ndarray | None,
    weights: np.ndarray | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augmenter=None,
):
    """A tf.data pipeline over in-memory arrays: shuffled indices -> batches -> gather (uint8
    images become float32 (B, S, S, 1) raw pixels) -> augmentation -> prefetch.

    x is uint8 images (N, S, S) or cached float features (N, h, w, c). Yields (x, y, w) with
    weights, (x, y) without, or x alone without labels."""
    import tensorflow as tf

    n = len(x)
    data = tf.convert_to_tensor(x)
    labels = None if y_onehot is None else tf.convert_to_tensor(y_onehot.astype(np.float32))
    w = None if weights is None else tf.convert_to_tensor(weights.astype(np.float32))
    is_image = x.dtype == np.uint8

    def load(idx):
        batch = tf.gather(data, idx)
        if is_image:
            batch = tf.cast(batch, tf.float32)[..., None]
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        if labels is None:
            return batch
        if w is None:
            return batch, tf.gather(labels, idx)
        return batch, tf.gather(labels, idx), tf.gather(w, idx)

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-sample weights: balanced = n / (K * n_c) (sklearn's), none = ones."""
    if mode == "none":
        return np.ones(len(y), dtype=np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(float)
    per_class = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return per_class[y].astype(np.float32)
