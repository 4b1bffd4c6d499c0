"""The simple CXR CNN of seed 004 (grey 150x150, COVID-19 vs normal)."""

from __future__ import annotations

import keras
from keras import layers

from dicomnode.nets._common import check_positive, image_input

#: Grad-CAM target: the fifth (deepest) convolution, named as in the seed's summary.
SMALL_CNN_GRADCAM_LAYER = "conv2d_4"
#: Meaning of the sigmoid output's labels in seed 004.
SMALL_CNN_LABELS = ("covid19", "normal")

# Filters per block as multiples of ``width`` (32-64-64-128-256 at width 32) and the
# dropout after each block's convolution (None: no dropout), as in the seed.
_BLOCK_FACTORS = (1, 2, 2, 4, 8)
_BLOCK_DROPOUT = (None, 0.1, None, 0.2, 0.2)


def small_cnn(
    input_size: int = 150, width: int = 32, dense_units: int = 128, channels: int = 1
) -> keras.Model:
    """Seed 004's five-block CNN with one sigmoid output.

    Seed facts implemented: input ``(150, 150, 1)``, a grey CXR scaled by 1/255 (by the
    caller); five blocks of 3x3 ReLU conv ('same') -> [Dropout] -> BatchNorm ->
    MaxPool(2, stride 2, 'same') with ``width * (1, 2, 2, 4, 8)`` filters
    (32-64-64-128-256) and dropout 0.1 / 0.2 / 0.2 after the second, fourth and fifth
    convolutions; Flatten -> ``Dense(dense_units, relu)`` -> Dropout(0.2) ->
    ``Dense(1, sigmoid)``. Labels: 0 = COVID-19, 1 = normal, so the output is
    P(normal). At the defaults it has the seed's 1,246,401 parameters (1,088
    non-trainable). The seed's summary is cut after the fifth convolution; its dropout
    there (0.2) is assumed from the pattern of the fourth block (it has no parameters).

    Layer names are those of the seed's Keras summary (``conv2d``, ``conv2d_1``, ...).
    Grad-CAM layer: ``conv2d_4``. Model name: ``small_cnn``.
    """
    check_positive("width", width)
    check_positive("dense_units", dense_units)
    inputs = image_input(input_size, channels)
    x = inputs
    n_dropout = 0
    for index, (factor, rate) in enumerate(zip(_BLOCK_FACTORS, _BLOCK_DROPOUT, strict=True)):
        suffix = f"_{index}" if index else ""
        x = layers.Conv2D(
            width * factor,
            (3, 3),
            strides=1,
            padding="same",
            activation="relu",
            name=f"conv2d{suffix}",
        )(x)
        if rate is not None:
            x = layers.Dropout(rate, name=f"dropout_{n_dropout}" if n_dropout else "dropout")(x)
            n_dropout += 1
        x = layers.BatchNormalization(name=f"batch_normalization{suffix}")(x)
        x = layers.MaxPooling2D((2, 2), strides=2, padding="same", name=f"max_pooling2d{suffix}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(0.2, name=f"dropout_{n_dropout}")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="dense_1", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


__all__ = ["SMALL_CNN_GRADCAM_LAYER", "SMALL_CNN_LABELS", "small_cnn"]
