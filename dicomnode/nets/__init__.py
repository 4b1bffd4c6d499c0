"""Keras 3 builders of the seed architectures.

Every builder returns an uncompiled ``keras.Model`` with a stable ``name`` and stable
layer names. Only Keras 3 public APIs are used (``keras.layers``, ``keras.Model``,
``keras.applications`` with ``weights=None``), never TensorFlow directly, so the same
code builds under ``KERAS_BACKEND=tensorflow`` (the default) and ``jax``. Images are
channels-last; scaling to [0, 1] is the caller's job, as in the seeds. Output layers
compute in float32, so a global ``mixed_float16`` policy still yields float32
probabilities.

Width is a parameter of each builder (``width``, ``width_multiplier``, ``channels`` or
``growth_rate``) so that small variants train on a CPU; the defaults reproduce the seed
architectures.

:data:`ARCHITECTURES` maps the architecture names used in model manifests to builders;
:data:`GRADCAM_LAYERS` names the Grad-CAM target layer of those that have one.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from dicomnode.nets.classifiers import (
    INCEPTIONV3_GRADCAM_LAYER,
    SEED_CLASS_NAMES,
    VGG16_GRADCAM_LAYER,
    VGG19_GRADCAM_LAYER,
    inceptionv3_classifier,
    stacked_ensemble,
    stacking_meta,
    vgg16_classifier,
    vgg19_classifier,
)
from dicomnode.nets.ct import DENSENET_GRADCAM_LAYER, densenet121_sigmoid
from dicomnode.nets.detector import opacity_mobilenet
from dicomnode.nets.mobilenet import MOBILENET_GRADCAM_LAYER, mobilenetv2_classifier
from dicomnode.nets.segmentation import opacity_resnet
from dicomnode.nets.small_cnn import SMALL_CNN_GRADCAM_LAYER, SMALL_CNN_LABELS, small_cnn
from dicomnode.nets.unet import lung_unet, opacity_unet

#: Architecture name (as written in a model manifest) -> builder.
ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "lung_unet": lung_unet,
    "vgg16_classifier": vgg16_classifier,
    "vgg19_classifier": vgg19_classifier,
    "inceptionv3_classifier": inceptionv3_classifier,
    "stacking_meta": stacking_meta,
    "opacity_mobilenet": opacity_mobilenet,
    "opacity_resnet": opacity_resnet,
    "opacity_unet": opacity_unet,
    "densenet121_sigmoid": densenet121_sigmoid,
    "small_cnn": small_cnn,
    "mobilenetv2_classifier": mobilenetv2_classifier,
}

#: Architecture name -> name of the layer Grad-CAM differentiates against (the deepest
#: convolutional feature map). The layer has this name at every width. Segmentation nets
#: and the stacking meta-learner have none and are absent.
GRADCAM_LAYERS: dict[str, str] = {
    "vgg16_classifier": VGG16_GRADCAM_LAYER,
    "vgg19_classifier": VGG19_GRADCAM_LAYER,
    "inceptionv3_classifier": INCEPTIONV3_GRADCAM_LAYER,
    "densenet121_sigmoid": DENSENET_GRADCAM_LAYER,
    "small_cnn": SMALL_CNN_GRADCAM_LAYER,
    "mobilenetv2_classifier": MOBILENET_GRADCAM_LAYER,
}


def build(architecture: str, **kwargs: object) -> keras.Model:
    """Build ``architecture`` (a key of :data:`ARCHITECTURES`) with the builder's ``kwargs``.

    An unknown name raises ``KeyError`` listing the known ones.
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {architecture!r}; known: {known}") from None
    return builder(**kwargs)


__all__ = [
    "ARCHITECTURES",
    "GRADCAM_LAYERS",
    "SEED_CLASS_NAMES",
    "SMALL_CNN_LABELS",
    "build",
    "densenet121_sigmoid",
    "inceptionv3_classifier",
    "lung_unet",
    "mobilenetv2_classifier",
    "opacity_resnet",
    "opacity_unet",
    "small_cnn",
    "stacked_ensemble",
    "stacking_meta",
    "vgg16_classifier",
    "vgg19_classifier",
]
