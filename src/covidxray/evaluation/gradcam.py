"""Grad-CAM: where in the X-ray the model looked, for any backbone the project builds.

The model's layout (networks/builders.py): Input -> "preprocess" -> nested "backbone" Model (last conv
feature map, 4-D) -> head layers (models.model_parts). We replay that chain under a GradientTape
watching the backbone's output, so no backbone-specific layer names are needed.
"""

from __future__ import annotations


import numpy as np

from covidxray.networks.builders import model_parts


def _class_scores(head, features, class_index: int):
    """The class score after the head: the pre-softmax logit where the head ends in softmax
    (gradients of a saturated probability vanish), else the output itself."""
    import keras
    import tensorflow as tf

    h = features
    last = len(head) - 1
    for i, layer in enumerate(head):
        activation = getattr(layer, "activation", None)
        if i == last and isinstance(layer, keras.layers.Softmax):
            break
        if i == last and isinstance(layer, keras.layers.Dense) and activation is keras.activations.softmax:
            h = tf.matmul(h, layer.kernel)
            if layer.use_bias:
                h = h + layer.bias
            break
        if i == last and isinstance(layer, keras.layers.Activation) and activation is keras.activations.softmax:
            break
        h = layer(h, training=False)
    return h[:, class_index]


def gradcam(model, images: np.ndarray, class_index: int = -1, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heat maps (N, S, S) in [0, 1] for class `class_index` of uint8/float images
    (N, S, S) or (N, S, S, 1) holding raw 0..255 pixels (what the model takes)."""
    import tensorflow as tf

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    n, height, width = x.shape[:3]
    preprocess, backbone, head = model_parts(model)
    n_classes = int(model.output_shape[-1])
    class_index = class_index % n_classes
    maps = []
    for start in range(0, n, batch_size):
        batch = tf.convert_to_tensor(x[start : start + batch_size])
        with tf.GradientTape() as tape:
            h = backbone(preprocess(batch), training=False)
            if len(h.shape) != 4:
                raise ValueError(f"the backbone's output must be a 4-D feature map, got shape {h.shape}")
            tape.watch(h)
            score = _class_scores(head, h, class_index)
        grads = tape.gradient(score, h)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * h, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0].numpy()
        maps.append(cam)
    cams = np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, height, width), np.float32)
    peak = cams.reshape(len(cams), -1).max(axis=1) if len(cams) else np.zeros(0)
    scale = np.where(peak > 0, peak, 1.0)[:, None, None]
    return np.clip(cams / scale, 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """An RGB uint8 picture: the grayscale image with the heat map (jet colours) blended over it."""
    from matplotlib import colormaps

    gray = np.asarray(image, dtype=np.float32)
    if gray.ndim == 3:
        gray = gray[..., 0]
    base = np.repeat(gray[..., None] / 255.0, 3, axis=-1)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    return np.clip(255.0 * ((1 - alpha) * base + alpha * heat), 0, 255).astype(np.uint8)
