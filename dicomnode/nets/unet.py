"""U-Nets of the seeds: the lung-mask U-Net (seed 000) and the opacity U-Net (seed 002).

Both take a one-channel grey image and return a one-channel sigmoid mask of the same
size. Pre-processing (resize, scale to [0, 1]) is not part of the models, as in the seeds.
"""

from __future__ import annotations

from typing import Literal

import keras
from keras import layers

from dicomnode.nets._common import check_divisible, check_positive, image_input

#: Number of 2x2 max-pool steps in :func:`lung_unet` (five levels).
LUNG_UNET_POOLINGS = 4


def lung_unet(
    input_size: int = 256,
    width: int = 64,
    dropout: float = 0.2,
    merge: Literal["add", "concatenate"] = "add",
    up_dilation: int = 2,
) -> keras.Model:
    """The seed 000 lung-mask U-Net (the notebook's "dilated" U-Net, saved as ``unet.hdf5``).

    Seed facts implemented:

    - input ``(input_size, input_size, 1)``, a grey CXR resized to 256x256 and scaled
      by 1/255 (scaling is done by the caller);
    - five levels of two 3x3 ReLU convolutions (``he_normal``) with
      ``width * (1, 2, 4, 8, 16)`` filters, 64-128-256-512-1024 at the default width,
      2x2 max pooling between levels;
    - ``Dropout(dropout)`` (0.2) after the fourth and fifth (two deepest) levels; the
      dropped-out level-4 features are both pooled and used as the skip connection;
    - decoder: ``UpSampling2D(2)`` then a 2x2 ReLU convolution with dilation rate
      ``up_dilation`` (2 in the notebook's "dilated" variant), merged with the skip
      connection by element-wise addition (``merge="add"``, the notebook's variant;
      ``"concatenate"`` gives the classic U-Net), then two 3x3 convolutions;
    - a 3x3 ReLU convolution to 2 channels, then a 1x1 sigmoid convolution: one
      channel, threshold 0.5 for the lung mask.

    Layer creation order follows the seed, so Keras 2 weights saved from the seed model
    (``unet.hdf5``) can be loaded by topological order with ``load_weights``.
    Grad-CAM: none (segmentation model). Model name: ``lung_unet``.
    """
    check_divisible(input_size, 2**LUNG_UNET_POOLINGS, "four 2x2 poolings")
    check_positive("width", width)
    check_positive("up_dilation", up_dilation)
    if merge not in ("add", "concatenate"):
        raise ValueError(f"merge must be 'add' or 'concatenate', got {merge!r}")
    filters = [width * factor for factor in (1, 2, 4, 8, 16)]

    def conv(n: int, name: str, kernel: int = 3, dilation: int = 1) -> layers.Conv2D:
        return layers.Conv2D(
            n,
            kernel,
            activation="relu",
            padding="same",
            dilation_rate=dilation,
            kernel_initializer="he_normal",
            name=name,
        )

    inputs = image_input(input_size, 1)
    skips: list[keras.KerasTensor] = []
    x = inputs
    for level in range(1, 6):
        x = conv(filters[level - 1], f"down{level}_conv1")(x)
        x = conv(filters[level - 1], f"down{level}_conv2")(x)
        if level >= 4:
            x = layers.Dropout(dropout, name=f"down{level}_dropout")(x)
        if level < 5:
            skips.append(x)
            x = layers.MaxPooling2D(pool_size=(2, 2), name=f"down{level}_pool")(x)

    for level in range(4, 0, -1):
        x = layers.UpSampling2D(size=(2, 2), name=f"up{level}_upsampling")(x)
        x = conv(filters[level - 1], f"up{level}_upconv", kernel=2, dilation=up_dilation)(x)
        skip = skips[level - 1]
        if merge == "add":
            x = layers.Add(name=f"up{level}_merge")([skip, x])
        else:
            x = layers.Concatenate(name=f"up{level}_merge")([skip, x])
        x = conv(filters[level - 1], f"up{level}_conv1")(x)
        x = conv(filters[level - 1], f"up{level}_conv2")(x)

    x = conv(2, "up1_conv3")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="lung_unet")


def opacity_unet(
    input_size: int = 256,
    start_channels: int = 64,
    depth: int = 5,
    inc_rate: float = 2.0,
    dropout: float = 0.5,
    batchnorm: bool = True,
    maxpool: bool = True,
    upconv: bool = True,
    residual: bool = True,
) -> keras.Model:
    """The opacity-mask U-Net of seed 002 (RSNA boxes painted as masks).

    Seed facts implemented (defaults are the seed's ``UNet`` defaults):

    - input ``(input_size, input_size, 1)``, a grey CXR resized to 256 (or 320);
    - ``depth`` levels starting at ``start_channels`` filters, multiplied by
      ``inc_rate`` per level, plus a bottom block;
    - each conv block: 3x3 ReLU conv, BatchNorm, ``SpatialDropout2D(dropout)``, 3x3
      ReLU conv, BatchNorm, and with ``residual`` the block input concatenated to its
      output ("residual concatenation");
    - down: max pooling (or a stride-2 3x3 conv); up: ``UpSampling2D`` + 2x2 ReLU conv
      (or a stride-2 3x3 transposed conv), concatenated with the skip, then a conv block;
    - a 1x1 sigmoid convolution to one channel.

    The seed's code applied spatial dropout 0.5 in every block through a default
    argument; here every block uses ``dropout`` (same network at the default).
    The seed's printed summary (10,700,546 parameters, 5,888 non-trainable) is this
    builder with ``start_channels=32, depth=4``.
    Grad-CAM: none (segmentation model). Model name: ``opacity_unet``.
    """
    check_divisible(input_size, 2**depth, f"{depth} down-sampling steps")
    check_positive("start_channels", start_channels)
    check_positive("depth", depth)

    def conv_block(x: keras.KerasTensor, dim: int, name: str) -> keras.KerasTensor:
        n = layers.Conv2D(dim, 3, activation="relu", padding="same", name=f"{name}_conv1")(x)
        if batchnorm:
            n = layers.BatchNormalization(name=f"{name}_bn1")(n)
        if dropout:
            n = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(n)
        n = layers.Conv2D(dim, 3, activation="relu", padding="same", name=f"{name}_conv2")(n)
        if batchnorm:
            n = layers.BatchNormalization(name=f"{name}_bn2")(n)
        if residual:
            n = layers.Concatenate(name=f"{name}_residual")([x, n])
        return n

    def level_block(x: keras.KerasTensor, dim: int, level: int) -> keras.KerasTensor:
        if level == depth:
            return conv_block(x, dim, "bottom")
        n = conv_block(x, dim, f"down{level}")
        if maxpool:
            m = layers.MaxPooling2D(name=f"down{level}_pool")(n)
        else:
            m = layers.Conv2D(dim, 3, strides=2, padding="same", name=f"down{level}_stride")(n)
        m = level_block(m, int(inc_rate * dim), level + 1)
        if upconv:
            m = layers.UpSampling2D(name=f"up{level}_upsampling")(m)
            m = layers.Conv2D(dim, 2, activation="relu", padding="same", name=f"up{level}_upconv")(
                m
            )
        else:
            m = layers.Conv2DTranspose(
                dim, 3, strides=2, activation="relu", padding="same", name=f"up{level}_upconv"
            )(m)
        n = layers.Concatenate(name=f"up{level}_merge")([n, m])
        return conv_block(n, dim, f"up{level}")

    inputs = image_input(input_size, 1)
    x = level_block(inputs, start_channels, 0)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="opacity_unet")


__all__ = ["LUNG_UNET_POOLINGS", "lung_unet", "opacity_unet"]
