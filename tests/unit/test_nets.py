"""nets: the seed architectures build, train a step, survive a .keras round trip, match the seeds.

Tiny widths and inputs keep the file fast on a small CPU; the full-width checks build
only models that take a second or two and compare parameter counts with numbers worked
out from the architecture definitions or printed in the seeds.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from dicomnode import nets
from dicomnode.nets.classifiers import _vgg_features
from dicomnode.nets.ct import DENSENET121_BLOCKS, _densenet_features

NETS_DIR = Path(nets.__file__).parent

# Keras' own numpy conversions (when saving) warn under NumPy 2; not this code's concern.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

#: (architecture, tiny builder kwargs, expected model name, expected output shape w/o batch)
TINY_CASES: list[tuple[str, dict[str, Any], str, tuple[int, ...]]] = [
    ("lung_unet", {"input_size": 32, "width": 2}, "lung_unet", (32, 32, 1)),
    (
        "vgg16_classifier",
        {"input_size": 96, "width_multiplier": 1 / 32, "head_channels": 8},
        "vgg16_multiclass_finetuned",
        (3,),
    ),
    (
        "vgg19_classifier",
        {"input_size": 96, "width_multiplier": 1 / 32, "head_channels": 8},
        "vgg19_multiclass_finetuned",
        (3,),
    ),
    (
        "inceptionv3_classifier",
        {"input_size": 96, "width_multiplier": 1 / 16, "head_channels": 8},
        "inceptionv3_multiclass_finetuned",
        (3,),
    ),
    ("stacking_meta", {}, "stacking_meta", (3,)),
    (
        "opacity_resnet",
        {"input_size": 32, "channels": 2, "depth": 3},
        "opacity_resnet",
        (32, 32, 1),
    ),
    (
        "opacity_resnet",
        {"input_size": 32, "channels": 2, "depth": 3, "head": "transpose", "head_filters": (4, 4)},
        "opacity_resnet",
        (32, 32, 1),
    ),
    # The detector: MobileNetV2 (random weights here, frozen) and a decoder; map at 1/8.
    ("opacity_mobilenet", {"input_size": 64, "channels": 4}, "opacity_mobilenet", (8, 8, 1)),
    (
        "opacity_unet",
        {"input_size": 32, "start_channels": 2, "depth": 2},
        "opacity_unet",
        (32, 32, 1),
    ),
    (
        "densenet121_sigmoid",
        {"input_size": 32, "channels": 1, "growth_rate": 4, "blocks": (1, 2, 1, 1)},
        "densenet121_sigmoid",
        (1,),
    ),
    ("small_cnn", {"input_size": 64, "width": 2, "dense_units": 4}, "small_cnn", (1,)),
    ("mobilenetv2_classifier", {"input_size": 32, "n_classes": 3}, "mobilenetv2_cxr", (3,)),
]
TINY_IDS = [f"{arch}-{kwargs.get('head', 'default')}" for arch, kwargs, _, _ in TINY_CASES]
SOFTMAX_ARCHITECTURES = {
    "mobilenetv2_classifier",
    "vgg16_classifier",
    "vgg19_classifier",
    "inceptionv3_classifier",
    "stacking_meta",
}
BATCH = 2


def _inputs(model: keras.Model, seed: int = 0) -> np.ndarray | list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = [rng.random((BATCH, *tensor.shape[1:]), dtype=np.float32) for tensor in model.inputs]
    return arrays[0] if len(arrays) == 1 else arrays


def _targets(architecture: str, model: keras.Model) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = (BATCH, *model.outputs[0].shape[1:])
    if architecture in SOFTMAX_ARCHITECTURES:
        return np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], BATCH)]
    return (rng.random(shape) > 0.5).astype(np.float32)


def _predict(model: keras.Model, x: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Inference-mode call (dropout off); eager, so no graph tracing per model."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def _non_trainable(model: keras.Model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.non_trainable_weights)


def _conv3x3(cin: int, cout: int) -> int:
    return 9 * cin * cout + cout


# --- registry -------------------------------------------------------------------------


def test_registry_names_every_builder_and_gradcam_layers_belong_to_it() -> None:
    assert set(nets.ARCHITECTURES) == {arch for arch, _, _, _ in TINY_CASES}
    assert set(nets.GRADCAM_LAYERS) <= set(nets.ARCHITECTURES)
    assert nets.GRADCAM_LAYERS["vgg16_classifier"] == "block5_conv3"
    assert nets.GRADCAM_LAYERS["vgg19_classifier"] == "block5_conv4"


def test_unknown_architecture_is_refused_with_the_known_names() -> None:
    with pytest.raises(KeyError) as info:
        nets.build("resnet50")
    assert "resnet50" in str(info.value)
    assert "lung_unet" in str(info.value)


def test_nets_never_import_tensorflow() -> None:
    """Keras 3 APIs only, so the builders also run under KERAS_BACKEND=jax."""
    sources = sorted(NETS_DIR.glob("*.py"))
    assert sources
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] != "tensorflow", f"{source.name} imports {module}"
                assert not module.startswith("keras.src"), f"{source.name} imports {module}"


# --- tiny models: shapes, ranges, Grad-CAM layer, one fit step, .keras round trip -----


@pytest.mark.parametrize(
    ("architecture", "kwargs", "name", "output_shape"), TINY_CASES, ids=TINY_IDS
)
def test_tiny_model_outputs_and_gradcam_layer(
    architecture: str, kwargs: dict[str, Any], name: str, output_shape: tuple[int, ...]
) -> None:
    model = nets.build(architecture, **kwargs)
    assert model.name == name
    prediction = _predict(model, _inputs(model))
    assert prediction.shape == (BATCH, *output_shape)
    assert np.all(np.isfinite(prediction))
    assert prediction.min() >= 0.0
    assert prediction.max() <= 1.0
    if architecture in SOFTMAX_ARCHITECTURES:
        np.testing.assert_allclose(prediction.sum(axis=-1), 1.0, rtol=1e-5)
    if architecture in nets.GRADCAM_LAYERS:
        layer = model.get_layer(nets.GRADCAM_LAYERS[architecture])
        assert len(layer.output.shape) == 4, "Grad-CAM needs a spatial feature map"
        # Grad-CAM re-runs the layers after its layer as a plain chain: check that
        # chaining them on the feature map gives the model's own output.
        tail = model.layers[model.layers.index(layer) + 1 :]
        out = layer.output
        for following in tail:
            out = following(out)
        chained = keras.Model(model.inputs[0], out)
        np.testing.assert_allclose(_predict(chained, _inputs(model)), prediction, rtol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "kwargs", "name", "output_shape"), TINY_CASES, ids=TINY_IDS
)
def test_tiny_model_takes_a_fit_step(
    architecture: str, kwargs: dict[str, Any], name: str, output_shape: tuple[int, ...]
) -> None:
    model = nets.build(architecture, **kwargs)
    loss = (
        "categorical_crossentropy"
        if architecture in SOFTMAX_ARCHITECTURES
        else "binary_crossentropy"
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=True)
    before = [np.array(weight.numpy()) for weight in model.trainable_weights]
    history = model.fit(
        _inputs(model), _targets(architecture, model), batch_size=BATCH, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])
    after = [np.array(weight.numpy()) for weight in model.trainable_weights]
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("architecture", "kwargs", "name", "output_shape"), TINY_CASES, ids=TINY_IDS
)
def test_tiny_model_reloads_from_keras_file_with_identical_predictions(
    architecture: str,
    kwargs: dict[str, Any],
    name: str,
    output_shape: tuple[int, ...],
    tmp_path: Path,
) -> None:
    model = nets.build(architecture, **kwargs)
    path = tmp_path / f"{architecture}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert loaded.name == name
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    x = _inputs(model, seed=7)
    expected = _predict(model, x)
    np.testing.assert_array_equal(_predict(loaded, x), expected)


def test_tiny_lung_unet_takes_a_compiled_graph_fit_step() -> None:
    """The fit-step test above runs eagerly for speed; one model also runs as a graph."""
    model = nets.lung_unet(input_size=32, width=2)
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=False)
    history = model.fit(
        _inputs(model), _targets("lung_unet", model), batch_size=BATCH, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])


def test_outputs_stay_float32_under_a_mixed_precision_policy() -> None:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = nets.small_cnn(input_size=32, width=2, dense_units=4)
        unet = nets.lung_unet(input_size=32, width=2)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("conv2d").compute_dtype == "float16"
    assert model.outputs[0].dtype == "float32"
    assert unet.outputs[0].dtype == "float32"


def test_stacked_ensemble_trains_only_the_meta_learner() -> None:
    members = [
        nets.vgg16_classifier(input_size=96, width_multiplier=1 / 32, head_channels=4),
        nets.vgg19_classifier(input_size=96, width_multiplier=1 / 32, head_channels=4),
        nets.inceptionv3_classifier(input_size=96, width_multiplier=1 / 16, head_channels=4),
    ]
    ensemble = nets.stacked_ensemble(members)
    assert ensemble.name == "stacking_ensemble_pruned"
    # Dense(9, relu) on 3 x 3 probabilities, then Dense(3, softmax): 90 + 30 weights.
    assert sum(int(np.prod(w.shape)) for w in ensemble.trainable_weights) == 9 * 9 + 9 + 9 * 3 + 3
    prediction = _predict(ensemble, _inputs(ensemble))
    assert prediction.shape == (BATCH, 3)
    np.testing.assert_allclose(prediction.sum(axis=-1), 1.0, rtol=1e-5)


def test_stacked_ensemble_refuses_members_with_different_inputs() -> None:
    members = [
        nets.vgg16_classifier(input_size=96, width_multiplier=1 / 32, head_channels=4),
        nets.vgg19_classifier(input_size=128, width_multiplier=1 / 32, head_channels=4),
    ]
    with pytest.raises(ValueError, match="input shape"):
        nets.stacked_ensemble(members)


# --- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "kwargs", "message"),
    [
        ("lung_unet", {"input_size": 250}, "multiple of 16"),
        ("lung_unet", {"merge": "multiply"}, "merge"),
        ("vgg16_classifier", {"input_size": 64, "width_multiplier": 0.1}, "too small"),
        ("vgg16_classifier", {"input_size": 96, "width_multiplier": 0.1, "head_conv": "x"}, "head"),
        ("opacity_resnet", {"input_size": 100}, "multiple of 16"),
        ("opacity_resnet", {"head": "deconv"}, "head"),
        ("densenet121_sigmoid", {"blocks": (6, 0)}, "blocks"),
        ("small_cnn", {"width": 0}, "width"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(
    architecture: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nets.build(architecture, **kwargs)


# --- full width: the seed architectures exactly ---------------------------------------


def test_full_width_vgg16_head_has_the_seed_layers_and_parameter_count() -> None:
    model = nets.vgg16_classifier()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in convs][-2:] == ["block5_conv3", "extra_conv1_vgg16"]
    assert len(convs) == 13 + 1
    assert tuple(model.get_layer("block5_conv3").output.shape) == (None, 16, 16, 512)
    assert tuple(model.inputs[0].shape) == (None, 256, 256, 3)
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    backbone = sum(_conv3x3(cin, cout) for cin, cout in itertools.pairwise(channels))
    head = (5 * 5 * 512 * 1024 + 1024) + (1024 * 3 + 3)
    assert backbone == 14_714_688  # Keras' VGG16(include_top=False)
    assert model.count_params() == backbone + head == 27_825_987


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_own_vgg_stack_at_full_width_is_keras_vgg(arch: str) -> None:
    reference = (keras.applications.VGG16 if arch == "vgg16" else keras.applications.VGG19)(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    inputs = keras.Input((64, 64, 3))
    own = keras.Model(inputs, _vgg_features(inputs, arch, 1.0))
    assert [layer.name for layer in own.layers[1:]] == [
        layer.name for layer in reference.layers[1:]
    ]
    assert own.count_params() == reference.count_params()


def test_full_width_vgg19_and_inception_heads_have_their_gradcam_layers() -> None:
    vgg19 = nets.vgg19_classifier()
    assert tuple(vgg19.get_layer("block5_conv4").output.shape) == (None, 16, 16, 512)
    inception = nets.inceptionv3_classifier()
    assert tuple(inception.get_layer("mixed10").output.shape) == (None, 6, 6, 2048)
    # Keras' InceptionV3(include_top=False) has 21,802,784 parameters; plus the seed head.
    head = (5 * 5 * 2048 * 1024 + 1024) + (1024 * 3 + 3)
    assert inception.count_params() == 21_802_784 + head


def test_full_width_lung_unet_matches_the_seed_definition() -> None:
    model = nets.lung_unet()
    f = [64, 128, 256, 512, 1024]
    encoder = _conv3x3(1, f[0]) + _conv3x3(f[0], f[0])
    encoder += sum(_conv3x3(f[i - 1], f[i]) + _conv3x3(f[i], f[i]) for i in range(1, 5))
    # up-sampling + 2x2 conv to the skip's width, added (not concatenated) to the skip
    decoder = sum((4 * f[i + 1] * f[i] + f[i]) + 2 * _conv3x3(f[i], f[i]) for i in range(4))
    output = _conv3x3(f[0], 2) + (2 * 1 + 1)
    assert model.count_params() == encoder + decoder + output == 27_898_245
    assert tuple(model.outputs[0].shape) == (None, 256, 256, 1)
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert [layer.rate for layer in dropouts] == [0.2, 0.2]
    merges = [layer for layer in model.layers if layer.name.endswith("_merge")]
    assert len(merges) == 4
    assert all(isinstance(layer, keras.layers.Add) for layer in merges)
    assert model.get_layer("up4_upconv").dilation_rate == (2, 2)


def test_lung_unet_concatenate_variant_is_the_classic_unet() -> None:
    model = nets.lung_unet(input_size=32, width=4, merge="concatenate")
    assert isinstance(model.get_layer("up1_merge"), keras.layers.Concatenate)
    assert tuple(model.get_layer("up1_merge").output.shape) == (None, 32, 32, 8)


def test_small_cnn_has_the_seed_summary_parameter_counts() -> None:
    model = nets.small_cnn()
    assert tuple(model.inputs[0].shape) == (None, 150, 150, 1)
    assert model.count_params() == 1_246_401
    assert _non_trainable(model) == 1_088
    assert tuple(model.get_layer("conv2d_4").output.shape) == (None, 10, 10, 256)


def test_opacity_resnet_transpose_head_has_the_seed_summary_parameter_counts() -> None:
    model = nets.opacity_resnet(input_size=320, head="transpose")
    assert model.count_params() == 14_957_729
    assert _non_trainable(model) == 10_432
    assert tuple(model.get_layer("head_transpose").output.shape) == (None, 80, 80, 128)
    assert tuple(model.outputs[0].shape) == (None, 320, 320, 1)


def test_opacity_resnet_default_is_the_upsampling_head() -> None:
    model = nets.opacity_resnet()
    assert tuple(model.get_layer("mask").output.shape) == (None, 16, 16, 1)
    assert tuple(model.outputs[0].shape) == (None, 256, 256, 1)
    momenta = {
        layer.momentum
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}


def test_opacity_unet_matches_the_seed_summary_parameter_counts() -> None:
    model = nets.opacity_unet(start_channels=32, depth=4)
    assert model.count_params() == 10_700_546
    assert _non_trainable(model) == 5_888


def test_own_densenet_at_full_width_is_keras_densenet121() -> None:
    reference = keras.applications.DenseNet121(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    inputs = keras.Input((64, 64, 3))
    own = keras.Model(inputs, _densenet_features(inputs, DENSENET121_BLOCKS, 32))
    assert own.count_params() == reference.count_params() == 7_037_504
    assert own.layers[-1].name == reference.layers[-1].name == "relu"
    model = nets.densenet121_sigmoid()
    assert model.count_params() == 7_037_504 + 1024 + 1
    assert tuple(model.get_layer("relu").output.shape) == (None, 7, 7, 1024)
