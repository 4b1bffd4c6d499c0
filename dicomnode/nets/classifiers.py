"""The seed 000 CXR classifiers: VGG-16, VGG-19 and Inception-V3 with the seed head.

Every member is a backbone truncated after its last convolutional block (the output of
``include_top=False``: ``block5_pool`` for the VGGs, ``mixed10`` for Inception-V3; the
notebook cut the fine-tuned VGG-16 at ``block5_pool``) topped with::

    ZeroPadding2D(1) -> Conv2D(1024, 5x5, stride 2, relu) -> GlobalAveragePooling2D
    -> Dropout(0.5) -> Dense(3, softmax)

Input: ``(256, 256, 3)``, the grey CXR repeated on three channels and scaled by 1/255
(the caller scales; no ImageNet mean subtraction). Output index order: 0 bacterial,
1 covid19, 2 normal (``flow_from_directory`` order). The stacking meta-learner of the
seed ensemble is :func:`stacking_meta`.

Layer names follow the seed notebook where it names them (``block5_conv3``,
``extra_conv1_vgg16``, ``predictions``, the model names) and Keras' applications
otherwise, so Grad-CAM finds its layer by name at every width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import keras
from keras import layers

from dicomnode.nets._common import IMAGE_INPUT_NAME, check_positive, image_input, scaled

HeadConv = Literal["conv", "separable"]

#: Grad-CAM target layers (the deepest conv layer of each backbone, as in the seed).
VGG16_GRADCAM_LAYER = "block5_conv3"
VGG19_GRADCAM_LAYER = "block5_conv4"
INCEPTIONV3_GRADCAM_LAYER = "mixed10"

#: Default input of the seed classifiers.
CLASSIFIER_INPUT_SIZE = 256
#: Class index order of the seed's three-class problem.
SEED_CLASS_NAMES = ("bacterial", "covid19", "normal")

_VGG_FILTERS = (64, 128, 256, 512, 512)
_VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}


def _vgg_features(
    inputs: keras.KerasTensor, arch: Literal["vgg16", "vgg19"], width_multiplier: float
) -> keras.KerasTensor:
    """VGG conv blocks with Keras' layer names and ``width_multiplier`` times the filters.

    At multiplier 1.0 this is layer for layer Keras' ``VGG16``/``VGG19`` with
    ``include_top=False``; the builders use ``keras.applications`` there.
    """
    x = inputs
    stages = zip(_VGG_CONVS[arch], _VGG_FILTERS, strict=True)
    for block, (n_convs, filters) in enumerate(stages, start=1):
        for index in range(1, n_convs + 1):
            x = layers.Conv2D(
                scaled(filters, width_multiplier),
                (3, 3),
                activation="relu",
                padding="same",
                name=f"block{block}_conv{index}",
            )(x)
        x = layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{block}_pool")(x)
    return x


def _conv_bn(
    x: keras.KerasTensor, filters: int, kernel: int, name: str, strides: int = 1
) -> keras.KerasTensor:
    """Conv (no bias) -> BatchNorm (no scale) -> ReLU, the Inception-V3 unit."""
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(scale=False, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=name)(x)


def _mixed_block(x: keras.KerasTensor, multiplier: float, name: str) -> keras.KerasTensor:
    """An Inception-A style block (1x1, 5x5, double 3x3, pool branches) concatenated."""
    b1 = _conv_bn(x, scaled(64, multiplier), 1, f"{name}_1x1")
    b5 = _conv_bn(x, scaled(48, multiplier), 1, f"{name}_5x5_reduce")
    b5 = _conv_bn(b5, scaled(64, multiplier), 5, f"{name}_5x5")
    b3 = _conv_bn(x, scaled(64, multiplier), 1, f"{name}_3x3_reduce")
    b3 = _conv_bn(b3, scaled(96, multiplier), 3, f"{name}_3x3a")
    b3 = _conv_bn(b3, scaled(96, multiplier), 3, f"{name}_3x3b")
    bp = layers.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    bp = _conv_bn(bp, scaled(32, multiplier), 1, f"{name}_pool_proj")
    return layers.Concatenate(name=name)([b1, b5, b3, bp])


def _inception_standin_features(
    inputs: keras.KerasTensor, width_multiplier: float
) -> keras.KerasTensor:
    """A small Inception-style backbone for ``width_multiplier != 1``; NOT Inception-V3.

    Stem (two conv units, max pool: stride 4), then Inception-A style blocks
    ``mini_mixed0..2`` each followed by a stride-2 max pool, and a last block named
    ``mixed10`` at stride 32, as Inception-V3's final mixed block, so the Grad-CAM
    layer name is the same at every width.
    """
    x = _conv_bn(inputs, scaled(32, width_multiplier), 3, "stem1", strides=2)
    x = _conv_bn(x, scaled(64, width_multiplier), 3, "stem2")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for index in range(3):
        x = _mixed_block(x, width_multiplier, f"mini_mixed{index}")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"reduce{index}")(x)
    return _mixed_block(x, width_multiplier, INCEPTIONV3_GRADCAM_LAYER)


def _seed_head(
    features: keras.KerasTensor,
    arch: str,
    n_classes: int,
    head_channels: int,
    head_conv: HeadConv,
    dropout: float,
) -> keras.KerasTensor:
    """ZeroPadding2D(1) -> Conv2D(head_channels, 5x5, s2, relu) -> GAP -> Dropout -> softmax."""
    size = features.shape[1]
    if size is not None and size < 3:
        raise ValueError(
            f"the {arch} feature map is {size}x{size}, too small for the 5x5 head "
            "convolution; use a larger input_size"
        )
    x = layers.ZeroPadding2D(padding=(1, 1), name="head_zero_padding")(features)
    if head_conv == "conv":
        conv: layers.Layer = layers.Conv2D(
            head_channels, (5, 5), strides=2, activation="relu", name=f"extra_conv1_{arch}"
        )
    elif head_conv == "separable":
        conv = layers.SeparableConv2D(
            head_channels, (5, 5), strides=2, activation="relu", name=f"extra_conv_{arch}"
        )
    else:
        raise ValueError(f"head_conv must be 'conv' or 'separable', got {head_conv!r}")
    x = conv(x)
    x = layers.GlobalAveragePooling2D(name="head_global_average_pooling")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(n_classes, activation="softmax", name="predictions", dtype="float32")(x)


def _model_name(arch: str, head_conv: HeadConv) -> str:
    # The seed's names: "<arch>_custom" for the modality-specific stage (separable head),
    # "<arch>_multiclass_finetuned" for the fine-tuned three-class members.
    return f"{arch}_custom" if head_conv == "separable" else f"{arch}_multiclass_finetuned"


def _check_head_args(n_classes: int, head_channels: int, width_multiplier: float) -> None:
    check_positive("n_classes", n_classes)
    check_positive("head_channels", head_channels)
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}")


def _vgg_classifier(
    arch: Literal["vgg16", "vgg19"],
    input_size: int,
    n_classes: int,
    width_multiplier: float,
    head_channels: int,
    head_conv: HeadConv,
    dropout: float,
) -> keras.Model:
    _check_head_args(n_classes, head_channels, width_multiplier)
    inputs = image_input(input_size, 3)
    if width_multiplier == 1.0:
        application = keras.applications.VGG16 if arch == "vgg16" else keras.applications.VGG19
        backbone = application(
            include_top=False,
            weights=None,
            input_tensor=inputs,
            input_shape=(input_size, input_size, 3),
        )
        features = backbone.output
    else:
        features = _vgg_features(inputs, arch, width_multiplier)
    outputs = _seed_head(features, arch, n_classes, head_channels, head_conv, dropout)
    return keras.Model(inputs, outputs, name=_model_name(arch, head_conv))


def vgg16_classifier(
    input_size: int = CLASSIFIER_INPUT_SIZE,
    n_classes: int = 3,
    width_multiplier: float = 1.0,
    head_channels: int = 1024,
    head_conv: HeadConv = "conv",
    dropout: float = 0.5,
) -> keras.Model:
    """VGG-16 truncated at ``block5_pool`` with the seed head (seed 000 ensemble member).

    At ``width_multiplier=1.0`` the backbone is ``keras.applications.VGG16(include_top=False,
    weights=None)``; otherwise the same 13 convolutions and 5 pools with the same layer
    names (``block{b}_conv{c}``, ``block{b}_pool``) and scaled filters. ``head_conv=
    "separable"`` gives the modality-specific stage's SeparableConv2D head.
    Grad-CAM layer: ``block5_conv3``. Model name: ``vgg16_multiclass_finetuned``
    (``vgg16_custom`` with the separable head).
    """
    return _vgg_classifier(
        "vgg16", input_size, n_classes, width_multiplier, head_channels, head_conv, dropout
    )


def vgg19_classifier(
    input_size: int = CLASSIFIER_INPUT_SIZE,
    n_classes: int = 3,
    width_multiplier: float = 1.0,
    head_channels: int = 1024,
    head_conv: HeadConv = "conv",
    dropout: float = 0.5,
) -> keras.Model:
    """VGG-19 truncated at ``block5_pool`` with the seed head (seed 000 ensemble member).

    Same construction as :func:`vgg16_classifier` with 16 convolutions
    (``keras.applications.VGG19`` at full width).
    Grad-CAM layer: ``block5_conv4``. Model name: ``vgg19_multiclass_finetuned``.
    """
    return _vgg_classifier(
        "vgg19", input_size, n_classes, width_multiplier, head_channels, head_conv, dropout
    )


def inceptionv3_classifier(
    input_size: int = CLASSIFIER_INPUT_SIZE,
    n_classes: int = 3,
    width_multiplier: float = 1.0,
    head_channels: int = 1024,
    head_conv: HeadConv = "conv",
    dropout: float = 0.5,
) -> keras.Model:
    """Inception-V3 truncated after ``mixed10`` with the seed head (seed 000 member).

    Only ``width_multiplier=1.0`` is Inception-V3 (``keras.applications.InceptionV3(
    include_top=False, weights=None)``; at 256x256 input ``mixed10`` is 6x6x2048). Any
    other multiplier builds a small Inception-style stand-in (see
    ``_inception_standin_features``) with the same head and a last block also named
    ``mixed10``: good for tests and CPU training, not a scaled Inception-V3.
    Grad-CAM layer: ``mixed10``. Model name: ``inceptionv3_multiclass_finetuned``.
    """
    _check_head_args(n_classes, head_channels, width_multiplier)
    inputs = image_input(input_size, 3)
    if width_multiplier == 1.0:
        backbone = keras.applications.InceptionV3(
            include_top=False,
            weights=None,
            input_tensor=inputs,
            input_shape=(input_size, input_size, 3),
        )
        features = backbone.output
    else:
        features = _inception_standin_features(inputs, width_multiplier)
    outputs = _seed_head(features, "inceptionv3", n_classes, head_channels, head_conv, dropout)
    return keras.Model(inputs, outputs, name=_model_name("inceptionv3", head_conv))


def stacking_meta(
    n_members: int = 3,
    n_classes: int = 3,
    hidden_units: int | None = None,
    concatenated: bool = False,
) -> keras.Model:
    """The seed's stacking meta-learner on the members' class probabilities.

    Inputs: ``n_members`` tensors of shape ``(n_classes,)`` named
    ``member{i}_probabilities`` (i from 1), concatenated, then ``Dense(hidden_units,
    relu)`` and ``Dense(n_classes, softmax)``. ``hidden_units`` defaults to
    ``n_members * n_classes`` (9 for the seed's three members and three classes).
    With ``concatenated=True`` the model takes the members' outputs already
    concatenated, one input ``member_probabilities`` of shape ``(n_members * n_classes,)``
    (member 1's classes first), as the node's ensemble passes them
    (:func:`dicomnode.inference.geometry.combine`); the layers are the same.
    Grad-CAM: none. Model name: ``stacking_meta``.
    """
    check_positive("n_members", n_members)
    check_positive("n_classes", n_classes)
    units = n_members * n_classes if hidden_units is None else hidden_units
    check_positive("hidden_units", units)
    if concatenated:
        inputs: keras.KerasTensor | list[keras.KerasTensor] = keras.Input(
            shape=(n_members * n_classes,), name="member_probabilities"
        )
        x = inputs
    else:
        inputs = [
            keras.Input(shape=(n_classes,), name=f"member{index}_probabilities")
            for index in range(1, n_members + 1)
        ]
        x = inputs[0] if n_members == 1 else layers.Concatenate(name="members_concat")(inputs)
    x = layers.Dense(units, activation="relu", name="meta_hidden")(x)
    outputs = layers.Dense(
        n_classes, activation="softmax", name="meta_predictions", dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name="stacking_meta")


def stacked_ensemble(
    members: Sequence[keras.Model], meta: keras.Model | None = None
) -> keras.Model:
    """The seed's integrated stacking model: frozen members on one image, then the meta-learner.

    Each member is called as a nested model on a shared image input (so member names must
    differ, as the builders' names do) and is set ``trainable = False``, as in the seed,
    so fitting trains the meta-learner only. ``meta`` defaults to
    :func:`stacking_meta` sized from the members. Model name: ``stacking_ensemble_pruned``.
    """
    if not members:
        raise ValueError("stacked_ensemble needs at least one member model")
    shapes = {tuple(member.inputs[0].shape[1:]) for member in members}
    if len(shapes) != 1:
        raise ValueError(f"members must share one input shape, got {sorted(shapes)}")
    n_classes = members[0].outputs[0].shape[-1]
    if meta is None:
        meta = stacking_meta(len(members), n_classes)
    image = keras.Input(shape=shapes.pop(), name=IMAGE_INPUT_NAME)
    probabilities = []
    for member in members:
        member.trainable = False
        probabilities.append(member(image))
    outputs = meta(probabilities)
    return keras.Model(image, outputs, name="stacking_ensemble_pruned")


__all__ = [
    "CLASSIFIER_INPUT_SIZE",
    "INCEPTIONV3_GRADCAM_LAYER",
    "SEED_CLASS_NAMES",
    "VGG16_GRADCAM_LAYER",
    "VGG19_GRADCAM_LAYER",
    "inceptionv3_classifier",
    "stacked_ensemble",
    "stacking_meta",
    "vgg16_classifier",
    "vgg19_classifier",
]
