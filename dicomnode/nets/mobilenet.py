"""A MobileNetV2 CXR classifier started from the shared ImageNet backbone.

The model is ``keras.applications.MobileNetV2(alpha=1.0, include_top=False)`` (Keras 3,
any backend) on the node's usual input, the grey CXR repeated on three channels and
scaled by 1/255, with a ``Rescaling(2, offset=-1)`` layer first so the backbone sees the
``[-1, 1]`` range it was trained on, topped with::

    GlobalAveragePooling2D (``pooled_features``) -> Dropout -> Dense(n, softmax)

The layers are one flat functional graph (no nested model), so Grad-CAM finds
``out_relu`` by name and :mod:`dicomnode.training.prune` sees every convolution.

ImageNet weights come from ``pretrained/mobilenet_v2_imagenet`` under the data root: one
``.npy`` file per variable of the TF-slim checkpoint ``mobilenet_v2_1.0_224``, named
``<scope>_weights``, ``<scope>_depthwise_weights`` and ``<scope>_BatchNorm_<variable>``.
:func:`slim_name_map` maps every Keras variable to its file (the mapping in that
folder's PROVENANCE.md) and :func:`load_imagenet_backbone` assigns them, refusing a
missing file or a shape mismatch and returning what it assigned, variable by variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from dicomnode.nets._common import check_positive, image_input

#: Grad-CAM target layer (the last activation of the backbone).
MOBILENET_GRADCAM_LAYER = "out_relu"
#: Name of the pooled-feature layer (1,280 values) the OOD score and shortcut check read.
POOLED_FEATURES_LAYER = "pooled_features"
#: Folder of the ImageNet backbone under the data root.
IMAGENET_BACKBONE_DIR = "pretrained/mobilenet_v2_imagenet"
#: The number of MobileNetV2 inverted-residual blocks with an expansion layer (1..16).
_EXPANDED_BLOCKS = 16
#: Keras BatchNormalization variable -> slim BatchNorm variable.
_BN_VARIABLES = {
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "moving_mean",
    "moving_variance": "moving_variance",
}


class BackboneError(ValueError):
    """The ImageNet backbone files do not match the model (missing file, wrong shape)."""


def mobilenetv2_classifier(
    input_size: int = 224,
    n_classes: int = 3,
    channels: int = 3,
    dropout: float = 0.2,
) -> keras.Model:
    """MobileNetV2 (width 1.0) classifier; input ``(input_size, input_size, 3)`` in [0, 1].

    ``input_size`` must be a multiple of 32 and at least 32. The weights are random until
    :func:`load_imagenet_backbone` (or a trained model file) fills them.
    """
    check_positive("n_classes", n_classes)
    if input_size < 32 or input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32 and >= 32, got {input_size}")
    if channels != 3:
        raise ValueError(f"MobileNetV2 takes 3 channels (the grey image repeated), got {channels}")
    inputs = image_input(input_size, channels)
    x = layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one")(inputs)
    backbone = keras.applications.MobileNetV2(
        input_tensor=x, alpha=1.0, include_top=False, weights=None
    )
    features = backbone.output
    pooled = layers.GlobalAveragePooling2D(name=POOLED_FEATURES_LAYER)(features)
    pooled = layers.Dropout(dropout, name="head_dropout")(pooled)
    outputs = layers.Dense(n_classes, activation="softmax", name="predictions", dtype="float32")(
        pooled
    )
    return keras.Model(inputs, outputs, name="mobilenetv2_cxr")


def _scope_to_layers() -> dict[str, tuple[str, str]]:
    """slim scope -> (Keras conv layer, Keras batch-norm layer)."""
    mapping = {
        "Conv": ("Conv1", "bn_Conv1"),
        "expanded_conv_depthwise": ("expanded_conv_depthwise", "expanded_conv_depthwise_BN"),
        "expanded_conv_project": ("expanded_conv_project", "expanded_conv_project_BN"),
        "Conv_1": ("Conv_1", "Conv_1_bn"),
    }
    for index in range(1, _EXPANDED_BLOCKS + 1):
        for part in ("expand", "depthwise", "project"):
            mapping[f"expanded_conv_{index}_{part}"] = (
                f"block_{index}_{part}",
                f"block_{index}_{part}_BN",
            )
    return mapping


def slim_name_map(model: keras.Model) -> dict[str, str]:
    """``"<layer>/<variable>"`` of every backbone variable of ``model`` -> its slim file stem."""
    names: dict[str, str] = {}
    present = {layer.name: layer for layer in model.layers}
    for scope, (conv_name, bn_name) in _scope_to_layers().items():
        conv = present.get(conv_name)
        bn = present.get(bn_name)
        if conv is None or bn is None:
            raise BackboneError(f"model has no layer {conv_name!r} / {bn_name!r} (slim {scope})")
        kernel_file = (
            f"{scope}_depthwise_weights"
            if isinstance(conv, layers.DepthwiseConv2D)
            else f"{scope}_weights"
        )
        for variable in conv.weights:
            short = variable.path.split("/")[-1]
            if short not in ("kernel", "depthwise_kernel"):
                raise BackboneError(f"unexpected variable {variable.path!r} in {conv_name}")
            names[f"{conv_name}/{short}"] = kernel_file
        for variable in bn.weights:
            short = variable.path.split("/")[-1]
            names[f"{bn_name}/{short}"] = f"{scope}_BatchNorm_{_BN_VARIABLES[short]}"
    return names


@dataclass(frozen=True)
class AssignedVariable:
    """One backbone variable filled from a ``.npy`` file."""

    variable: str  # "<layer>/<variable>"
    file: str  # slim file stem
    shape: tuple[int, ...]


def load_imagenet_backbone(model: keras.Model, folder: Path) -> list[AssignedVariable]:
    """Assign every backbone variable of ``model`` from the ``.npy`` files in ``folder``.

    Every variable must find its file with the same shape, else :class:`BackboneError`
    (nothing partial is kept silently: the caller's model is then unusable). Returns the
    assignments in layer order; files left unused (the 1,001-class head's biases) are
    not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BackboneError(f"ImageNet backbone folder not found: {str(folder)!r}")
    assigned: list[AssignedVariable] = []
    names = slim_name_map(model)
    present = {layer.name: layer for layer in model.layers}
    for key, stem in names.items():
        layer_name, short = key.split("/")
        path = folder / f"{stem}.npy"
        if not path.is_file():
            raise BackboneError(f"{key}: backbone file {path.name} is missing")
        value = np.load(path)
        variable = next(v for v in present[layer_name].weights if v.path.split("/")[-1] == short)
        if tuple(value.shape) != tuple(variable.shape):
            raise BackboneError(
                f"{key}: {path.name} has shape {value.shape}, the model wants {variable.shape}"
            )
        variable.assign(value.astype(np.float32))
        assigned.append(AssignedVariable(key, stem, tuple(int(s) for s in value.shape)))
    return assigned


def pooled_feature_model(model: keras.Model) -> keras.Model:
    """``model``'s input -> its pooled 1,280 backbone features (same weights)."""
    return keras.Model(model.inputs, model.get_layer(POOLED_FEATURES_LAYER).output)
