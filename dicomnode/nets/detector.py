"""The opacity detector net: an ImageNet MobileNetV2 encoder with a small decoder.

The seeds' detectors (a residual down-sampling net or a U-Net trained from scratch on
25,000 RSNA images) cannot learn from the few hundred radiographs this project has, so
the encoder here is MobileNetV2 (width 1.0) with ImageNet weights, kept frozen; only a
small feature-pyramid decoder is trained. The decoder merges the encoder's stride-32,
-16 and -8 features and ends in a 1x1 sigmoid conv: an opacity probability map at 1/8
of the input (32 x 32 for a 256 input), which the post-processing resizes to the source.

The ImageNet weights come as one ``.npy`` file per TF-slim variable
(``/work/shared/data/pretrained/mobilenet_v2_imagenet``, see its PROVENANCE.md);
:func:`load_slim_mobilenet_v2` assigns them to ``keras.applications.MobileNetV2``.

Input: grey, 1 channel, scaled to [0, 1]; the model maps it to [-1, 1] and repeats it
to 3 channels itself, so the node feeds it like every other radiograph model.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from dicomnode.nets._common import check_divisible, check_positive

#: Encoder layers whose outputs the decoder reads (strides 8, 16, 32).
FEATURE_LAYERS = ("block_5_add", "block_12_add", "block_16_project_BN")
#: Output stride of the opacity map.
OUTPUT_STRIDE = 8
#: The decoder's BatchNorm momentum (the seeds' 0.9): with Keras' default 0.99 the moving
#: statistics of a decoder trained for a few hundred steps stay near their initial values,
#: and the map at inference is far from the one trained (high everywhere).
BN_MOMENTUM = 0.9


def _slim_names(keras_layer: str) -> str | None:
    """The TF-slim scope of a Keras MobileNetV2 layer (``None`` for layers without weights)."""
    if keras_layer in ("Conv1", "bn_Conv1"):
        return "Conv"
    if keras_layer in ("Conv_1", "Conv_1_bn"):
        return "Conv_1"
    if keras_layer.startswith("expanded_conv_"):
        part = keras_layer.removeprefix("expanded_conv_").removesuffix("_BN")
        return f"expanded_conv_{part}"
    if keras_layer.startswith("block_"):
        _, index, part = keras_layer.removesuffix("_BN").split("_", 2)
        return f"expanded_conv_{index}_{part}"
    return None


def load_slim_mobilenet_v2(model: keras.Model, folder: Path) -> int:
    """Assign the slim ``.npy`` weights in ``folder`` to ``model``'s MobileNetV2 layers;
    returns the number of arrays assigned. A missing file or a shape mismatch is an error."""
    folder = Path(folder)
    assigned = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        scope = _slim_names(layer.name)
        if scope is None:
            raise ValueError(f"no slim scope for MobileNetV2 layer {layer.name!r}")
        if isinstance(layer, layers.BatchNormalization):
            suffixes = ["gamma", "beta", "moving_mean", "moving_variance"]
            files = [f"{scope}_BatchNorm_{s}.npy" for s in suffixes]
        elif isinstance(layer, layers.DepthwiseConv2D):
            files = [f"{scope}_depthwise_weights.npy"]
        else:
            files = [f"{scope}_weights.npy"]
        arrays = [np.load(folder / name) for name in files]
        if isinstance(layer, layers.DepthwiseConv2D):
            # slim: (h, w, in, multiplier), the same layout Keras uses
            arrays = [a.reshape(layer.weights[0].shape) for a in arrays]
        for weight, array in zip(layer.weights, arrays, strict=True):
            if tuple(weight.shape) != array.shape:
                raise ValueError(
                    f"{layer.name}: {weight.path} has shape {tuple(weight.shape)}, "
                    f"the file {array.shape}"
                )
        layer.set_weights(arrays)
        assigned += len(arrays)
    return assigned


def mobilenet_v2_encoder(input_size: int, weights_dir: Path | None = None) -> keras.Model:
    """Grey [0, 1] input -> the three :data:`FEATURE_LAYERS` outputs of MobileNetV2,
    with ImageNet weights from ``weights_dir`` when given; not trainable."""
    check_positive("input_size", input_size)
    check_divisible(input_size, 32, "MobileNetV2 halves the input five times")
    grey = keras.Input((input_size, input_size, 1), name="image")
    rgb = layers.Concatenate(name="grey_to_rgb")([grey, grey, grey])
    scaled = layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(rgb)
    base = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), alpha=1.0, include_top=False, weights=None
    )
    if weights_dir is not None:
        load_slim_mobilenet_v2(base, Path(weights_dir))
    features = keras.Model(
        base.input, [base.get_layer(n).output for n in FEATURE_LAYERS], name="mobilenet_v2"
    )
    features.trainable = False
    return keras.Model(grey, features(scaled), name="encoder")


def opacity_decoder(input_size: int, channels: int = 64, dropout: float = 0.2) -> keras.Model:
    """The three encoder features -> the opacity probability map at stride 8."""
    check_positive("channels", channels)
    s8, s16, s32 = (input_size // 8, input_size // 16, input_size // 32)
    f8 = keras.Input((s8, s8, 32), name="stride8")
    f16 = keras.Input((s16, s16, 96), name="stride16")
    f32 = keras.Input((s32, s32, 320), name="stride32")
    x = layers.Conv2D(channels, 1, activation="relu", name="lat32")(f32)
    x = layers.UpSampling2D(2, interpolation="bilinear", name="up16")(x)
    x = layers.Concatenate(name="cat16")([x, f16])
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name="conv16")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="conv16_bn")(x)
    x = layers.ReLU(name="conv16_relu")(x)
    x = layers.UpSampling2D(2, interpolation="bilinear", name="up8")(x)
    x = layers.Concatenate(name="cat8")([x, f8])
    x = layers.SpatialDropout2D(dropout, name="dropout")(x)
    x = layers.Conv2D(channels // 2, 3, padding="same", use_bias=False, name="conv8")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="conv8_bn")(x)
    x = layers.ReLU(name="conv8_relu")(x)
    out = layers.Conv2D(1, 1, activation="sigmoid", name="opacity")(x)
    return keras.Model([f8, f16, f32], out, name="decoder")


def opacity_mobilenet(
    input_size: int = 256,
    channels: int = 64,
    weights_dir: Path | None = None,
    encoder: keras.Model | None = None,
    decoder: keras.Model | None = None,
) -> keras.Model:
    """The whole detector: grey image (1 channel, [0, 1]) -> opacity map at stride 8."""
    encoder = encoder or mobilenet_v2_encoder(input_size, weights_dir)
    decoder = decoder or opacity_decoder(input_size, channels)
    image = keras.Input((input_size, input_size, 1), name="image")
    return keras.Model(image, decoder(encoder(image)), name="opacity_mobilenet")
