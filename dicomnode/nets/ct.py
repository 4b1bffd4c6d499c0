"""The seed 001 CT slice classifier: DenseNet-121 with one sigmoid output."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from dicomnode.nets._common import check_positive, image_input

#: DenseNet-121: dense blocks of 6, 12, 24 and 16 layers, growth rate 32.
DENSENET121_BLOCKS = (6, 12, 24, 16)
DENSENET121_GROWTH_RATE = 32
#: Grad-CAM target: the last activation of the backbone (after the final BN).
DENSENET_GRADCAM_LAYER = "relu"
#: Assumed default input (seed 001 does not state one; DenseNet-121's own default).
CT_INPUT_SIZE = 224

_BN_EPSILON = 1.001e-5  # as in keras.applications.densenet


def _dense_conv_block(x: keras.KerasTensor, growth_rate: int, name: str) -> keras.KerasTensor:
    """BN-ReLU-1x1 conv (4k) -> BN-ReLU-3x3 conv (k), concatenated to the input."""
    y = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_0_bn")(x)
    y = layers.Activation("relu", name=f"{name}_0_relu")(y)
    y = layers.Conv2D(4 * growth_rate, 1, use_bias=False, name=f"{name}_1_conv")(y)
    y = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_1_bn")(y)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    return layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition_block(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Conv2D(x.shape[-1] // 2, 1, use_bias=False, name=f"{name}_conv")(x)
    return layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def _densenet_features(
    inputs: keras.KerasTensor, blocks: Sequence[int], growth_rate: int
) -> keras.KerasTensor:
    """A DenseNet backbone with ``keras.applications.densenet``'s layer names.

    With ``DENSENET121_BLOCKS`` and growth rate 32 it has DenseNet-121's layers and
    parameters; the builder uses ``keras.applications.DenseNet121`` in that case.
    """
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="zero_padding2d")(inputs)
    x = layers.Conv2D(2 * growth_rate, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="zero_padding2d_1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for stage, n_layers in enumerate(blocks, start=2):
        for index in range(1, n_layers + 1):
            x = _dense_conv_block(x, growth_rate, f"conv{stage}_block{index}")
        if stage < len(blocks) + 1:
            x = _transition_block(x, f"pool{stage}")
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name="bn")(x)
    return layers.Activation("relu", name=DENSENET_GRADCAM_LAYER)(x)


def densenet121_sigmoid(
    input_size: int = CT_INPUT_SIZE,
    channels: int = 3,
    growth_rate: int = DENSENET121_GROWTH_RATE,
    blocks: Sequence[int] = DENSENET121_BLOCKS,
) -> keras.Model:
    """DenseNet-121 with a single sigmoid output: P(COVID-19) for one axial CT slice (seed 001).

    With the default ``growth_rate`` and ``blocks`` the backbone is
    ``keras.applications.DenseNet121(include_top=False, weights=None)``; other values
    build the same kind of network with those dense blocks and growth rate (the width
    parameter; the stem has ``2 * growth_rate`` filters), for tests and CPU training.
    Head: ``GlobalAveragePooling2D`` (``avg_pool``) -> ``Dense(1, sigmoid)``
    (``predictions``). Input: ``(input_size, input_size, channels)``; seed 001 states no
    input size, 224 is assumed. Grad-CAM layer: ``relu``. Model name:
    ``densenet121_sigmoid``.
    """
    check_positive("growth_rate", growth_rate)
    blocks = tuple(blocks)
    if not blocks or any(not isinstance(n, int) or n <= 0 for n in blocks):
        raise ValueError(f"blocks must be positive layer counts, got {blocks!r}")
    inputs = image_input(input_size, channels)
    if growth_rate == DENSENET121_GROWTH_RATE and blocks == DENSENET121_BLOCKS:
        backbone = keras.applications.DenseNet121(
            include_top=False,
            weights=None,
            input_tensor=inputs,
            input_shape=(input_size, input_size, channels),
        )
        features = backbone.output
    else:
        features = _densenet_features(inputs, blocks, growth_rate)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    outputs = layers.Dense(1, activation="sigmoid", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="densenet121_sigmoid")


__all__ = [
    "CT_INPUT_SIZE",
    "DENSENET121_BLOCKS",
    "DENSENET121_GROWTH_RATE",
    "DENSENET_GRADCAM_LAYER",
    "densenet121_sigmoid",
]
