"""The residual down-sampling segmentation net of seeds 002 and 003 (opacity masks).

Trained on RSNA Pneumonia Detection images with the ground-truth boxes painted as a
mask; post-processing (threshold 0.5, connected components, one box per component)
lives with the detector, not here.
"""

from __future__ import annotations

from typing import Literal

import keras
from keras import layers

from dicomnode.nets._common import check_divisible, check_positive, image_input

OpacityHead = Literal["upsample", "transpose"]


def _bn_relu(x: keras.KerasTensor, momentum: float, name: str) -> keras.KerasTensor:
    """BatchNormalization(momentum) -> LeakyReLU(0) (that is, ReLU), as in the seeds."""
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.LeakyReLU(negative_slope=0.0, name=f"{name}_relu")(x)


def _downsample(
    x: keras.KerasTensor, channels: int, momentum: float, name: str
) -> keras.KerasTensor:
    """BN -> ReLU -> 1x1 conv (no bias) -> 2x2 max pool (the seeds' ``create_downsample``)."""
    x = _bn_relu(x, momentum, name)
    x = layers.Conv2D(channels, 1, padding="same", use_bias=False, name=f"{name}_conv")(x)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def _resblock(
    inputs: keras.KerasTensor, channels: int, momentum: float, name: str
) -> keras.KerasTensor:
    """Pre-activation residual block: (BN, ReLU, 3x3 conv) twice, added to the input."""
    x = _bn_relu(inputs, momentum, f"{name}_a")
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_a_conv")(x)
    x = _bn_relu(x, momentum, f"{name}_b")
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_b_conv")(x)
    return layers.Add(name=f"{name}_add")([x, inputs])


def opacity_resnet(
    input_size: int = 256,
    channels: int = 32,
    n_blocks: int = 2,
    depth: int = 4,
    head: OpacityHead = "upsample",
    bn_momentum: float = 0.9,
    head_filters: tuple[int, int] = (256, 128),
) -> keras.Model:
    """Residual down-sampling net with a sigmoid mask head (seeds 002/003 ``create_network``).

    Seed facts implemented:

    - input ``(input_size, input_size, 1)``: a grey CXR resized to 256 (or 320);
    - a 3x3 conv (no bias) with ``channels`` (32) filters; then ``depth`` (4) times:
      double the channels, a down-sampling unit (BN, ReLU, 1x1 conv, 2x2 max pool) and
      ``n_blocks`` (2) pre-activation residual blocks;
    - BatchNorm momentum ``bn_momentum`` (0.9) everywhere, ``LeakyReLU(0)`` as the
      activation;
    - ``head="upsample"`` (seed 003, the default): BN, ReLU, a 1x1 sigmoid conv and
      ``UpSampling2D(2**depth)`` back to the input size;
    - ``head="transpose"`` (seed 002): BN, ReLU, 1x1 conv to ``head_filters[0]`` (256),
      BN, ReLU, ``Conv2DTranspose(head_filters[1] (128), 8x8, stride 4)``, BN, ReLU,
      a 1x1 sigmoid conv and ``UpSampling2D(2**(depth - 2))``. With the defaults at
      320x320 it has the seed's 14,957,729 parameters (10,432 non-trainable).

    ``channels`` is the width parameter. Grad-CAM: none (segmentation model).
    Model name: ``opacity_resnet``.
    """
    check_divisible(input_size, 2**depth, f"{depth} 2x2 max-pool steps")
    check_positive("channels", channels)
    check_positive("n_blocks", n_blocks)
    check_positive("depth", depth)
    if head == "transpose" and depth < 2:
        raise ValueError(f"the transposed-conv head needs depth >= 2, got {depth}")

    inputs = image_input(input_size, 1)
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    for level in range(1, depth + 1):
        channels *= 2
        x = _downsample(x, channels, bn_momentum, f"down{level}")
        for block in range(1, n_blocks + 1):
            x = _resblock(x, channels, bn_momentum, f"res{level}_{block}")

    x = _bn_relu(x, bn_momentum, "head")
    if head == "upsample":
        factor = 2**depth
    elif head == "transpose":
        x = layers.Conv2D(head_filters[0], 1, name="head_conv")(x)
        x = _bn_relu(x, bn_momentum, "head_conv")
        x = layers.Conv2DTranspose(
            head_filters[1], (8, 8), (4, 4), padding="same", name="head_transpose"
        )(x)
        x = _bn_relu(x, bn_momentum, "head_transpose")
        factor = 2 ** (depth - 2)
    else:
        raise ValueError(f"head must be 'upsample' or 'transpose', got {head!r}")
    x = layers.Conv2D(1, 1, activation="sigmoid", name="mask", dtype="float32")(x)
    outputs = layers.UpSampling2D(factor, name="mask_upsampling", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="opacity_resnet")


__all__ = ["opacity_resnet"]
