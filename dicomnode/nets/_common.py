"""Small helpers shared by the builders in :mod:`dicomnode.nets`.

Only Keras 3 public APIs are used here and in the builders, so every model builds
under any Keras backend (TensorFlow by default, JAX on the GPU host).
"""

from __future__ import annotations

import keras

#: Name of the image input of every single-image model built here.
IMAGE_INPUT_NAME = "image"


def scaled(filters: int, multiplier: float) -> int:
    """Return ``filters * multiplier`` rounded, and never less than one filter."""
    if multiplier <= 0:
        raise ValueError(f"width multiplier must be positive, got {multiplier!r}")
    return max(1, round(filters * multiplier))


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` quoting ``value`` unless it is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_divisible(input_size: int, factor: int, why: str) -> None:
    """Raise ``ValueError`` unless ``input_size`` is a positive multiple of ``factor``."""
    check_positive("input_size", input_size)
    if input_size % factor:
        raise ValueError(f"input_size must be a multiple of {factor} ({why}), got {input_size}")


def image_input(input_size: int, channels: int) -> keras.KerasTensor:
    """A square channels-last image input named :data:`IMAGE_INPUT_NAME`."""
    check_positive("input_size", input_size)
    check_positive("channels", channels)
    return keras.Input(shape=(input_size, input_size, channels), name=IMAGE_INPUT_NAME)
