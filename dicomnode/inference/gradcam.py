"""Grad-CAM (Selvaraju et al.) on Keras 3 models, on any backend.

The model is split at the explained layer: a feature model (input -> that layer's
activations) and a tail (the chain of layers after it -> class scores). The one
gradient the method needs, d score / d activations, comes from a tiny per-backend
adapter (TensorFlow's GradientTape, JAX's grad, PyTorch's autograd); everything
else is ``keras.ops`` and numpy, so the same code runs on the GPU machine's JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dicomnode.inference.geometry import normalize_heatmap


def _gradient(fn: Callable[[Any], Any], x: Any) -> Any:
    """d sum(fn(x)) / dx with the active Keras backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(fn(x))
        return tape.gradient(total, x)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return jax.grad(lambda v: jnp.sum(fn(v)))(x)
    if backend == "torch":
        import torch

        x = torch.as_tensor(np.asarray(x)).requires_grad_(True)
        fn(x).sum().backward()
        return x.grad
    raise NotImplementedError(f"Grad-CAM has no gradient adapter for the {backend!r} backend")


class GradCAM:
    """Grad-CAM for one model and one layer; build once, call per batch."""

    def __init__(self, model: Any, layer_name: str) -> None:
        import keras

        self.layer = model.get_layer(layer_name)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.features = keras.Model(inputs, self.layer.output)
        self.tail = self._chain_after(model, self.layer)

    @staticmethod
    def _chain_after(model: Any, layer: Any) -> list[Any]:
        """The layers after ``layer`` up to the output, which must form a simple chain."""
        layers = model.layers
        start = layers.index(layer)
        chain = [lyr for lyr in layers[start + 1 :] if lyr.__class__.__name__ != "InputLayer"]
        previous = layer
        for lyr in chain:
            parents = {p.operation.name for p in lyr._inbound_nodes[0].parent_nodes}
            if parents != {previous.name}:
                raise ValueError(
                    f"Grad-CAM needs the layers after {layer.name!r} to form a chain; "
                    f"{lyr.name!r} takes {sorted(parents)}"
                )
            previous = lyr
        return chain

    def _scores(self, activations: Any, class_index: Any) -> Any:
        import keras

        out = activations
        for lyr in self.tail:
            out = lyr(out, training=False) if _takes_training(lyr) else lyr(out)
        return keras.ops.take_along_axis(out, class_index[:, None], axis=1)[:, 0]

    def __call__(self, images: np.ndarray, class_index: int | Sequence[int]) -> np.ndarray:
        """Heat maps (batch, h, w) in [0, 1] at the layer's resolution."""
        import keras

        activations = self.features(images, training=False)
        index = np.broadcast_to(np.asarray(class_index, dtype="int32"), (len(images),))
        index_t = keras.ops.convert_to_tensor(index)
        grads = _gradient(lambda a: self._scores(a, index_t), activations)
        a = keras.ops.convert_to_numpy(activations).astype(np.float64)
        g = keras.ops.convert_to_numpy(grads).astype(np.float64)
        weights = g.mean(axis=(1, 2))  # global-average-pooled gradients per channel
        cams = np.einsum("bhwc,bc->bhw", a, weights)
        return np.stack([normalize_heatmap(c) for c in cams])


def _takes_training(layer: Any) -> bool:
    return layer.__class__.__name__ in {"Dropout", "SpatialDropout2D", "BatchNormalization"}
