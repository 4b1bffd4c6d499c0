"""The MobileNetV2 member: its ImageNet backbone loaded variable by variable."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from dicomnode.nets.mobilenet import (
    BackboneError,
    load_imagenet_backbone,
    mobilenetv2_classifier,
    pooled_feature_model,
    slim_name_map,
)
from tests.support import shared_data


def test_name_map_covers_every_backbone_variable() -> None:
    model = mobilenetv2_classifier(64, n_classes=3)
    names = slim_name_map(model)
    backbone = [
        v for layer in model.layers for v in layer.weights if layer.name not in ("predictions",)
    ]
    assert len(names) == len(backbone) == 260
    assert len(set(names.values())) == 260  # one file per variable, none used twice
    assert names["Conv1/kernel"] == "Conv_weights"
    assert names["block_16_depthwise/kernel"] == "expanded_conv_16_depthwise_depthwise_weights"
    assert names["Conv_1_bn/moving_variance"] == "Conv_1_BatchNorm_moving_variance"


def test_input_size_is_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        mobilenetv2_classifier(100)


def _fake_backbone(
    model, folder: Path, skip: str = "", bad_shape: str = ""
) -> dict[str, np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for key, stem in slim_name_map(model).items():
        layer, short = key.split("/")
        variable = next(v for v in model.get_layer(layer).weights if v.path.endswith(short))
        shape = tuple(variable.shape)
        if stem == bad_shape:
            shape = (*shape[:-1], shape[-1] + 1)
        value = rng.normal(size=shape).astype(np.float32)
        if "moving_variance" in stem:
            value = np.abs(value) + 0.5
        if stem != skip:
            np.save(folder / f"{stem}.npy", value)
        written[key] = value
    np.save(folder / "Logits_Conv2d_1c_1x1_biases.npy", np.zeros(1001, np.float32))
    return written


def test_loading_assigns_each_variable_and_refuses_mismatches(tmp_path: Path) -> None:
    model = mobilenetv2_classifier(64)
    written = _fake_backbone(model, tmp_path / "ok")
    assigned = load_imagenet_backbone(model, tmp_path / "ok")
    assert len(assigned) == 260
    for item in assigned:
        layer, short = item.variable.split("/")
        variable = next(v for v in model.get_layer(layer).weights if v.path.endswith(short))
        np.testing.assert_array_equal(np.asarray(variable), written[item.variable])
    other = mobilenetv2_classifier(64)
    _fake_backbone(other, tmp_path / "missing", skip="expanded_conv_3_expand_BatchNorm_gamma")
    with pytest.raises(BackboneError, match="missing"):
        load_imagenet_backbone(other, tmp_path / "missing")
    _fake_backbone(other, tmp_path / "shape", bad_shape="Conv_1_weights")
    with pytest.raises(BackboneError, match="shape"):
        load_imagenet_backbone(other, tmp_path / "shape")
    with pytest.raises(BackboneError, match="not found"):
        load_imagenet_backbone(other, tmp_path / "absent")


def test_shared_imagenet_backbone_loads_variable_by_variable() -> None:
    folder = shared_data("pretrained", "mobilenet_v2_imagenet")
    model = mobilenetv2_classifier(96)
    assigned = load_imagenet_backbone(model, folder)
    files = {p.stem for p in folder.glob("*.npy")}
    assert {a.file for a in assigned} == files - {"Logits_Conv2d_1c_1x1_biases"}
    for item in assigned:
        layer, short = item.variable.split("/")
        variable = next(v for v in model.get_layer(layer).weights if v.path.endswith(short))
        np.testing.assert_array_equal(np.asarray(variable), np.load(folder / f"{item.file}.npy"))
    # The ImageNet features differ from a random-weight model's and are non-negative
    # (after ReLU6 and pooling).
    x = np.random.default_rng(0).uniform(0, 1, (2, 96, 96, 3)).astype(np.float32)
    pooled = np.asarray(pooled_feature_model(model)(x, training=False))
    assert pooled.shape == (2, 1280) and pooled.min() >= 0
    random = np.asarray(pooled_feature_model(mobilenetv2_classifier(96))(x, training=False))
    assert not np.allclose(pooled, random)


def test_apoz_pruning_reaches_the_expansion_convolutions() -> None:
    from dicomnode.training.prune import apoz, prunable_convolutions, prune_channels

    keras.utils.set_random_seed(3)
    model = mobilenetv2_classifier(64)
    prunable = {c.conv: c for c in prunable_convolutions(model)}
    expected = {"Conv1", "Conv_1"} | {f"block_{i}_expand" for i in range(1, 17)}
    assert set(prunable) == expected
    # A channel of block_5_expand that is zero after its ReLU6 for every input...
    bn = model.get_layer("block_5_expand_BN")
    gamma, beta, mean, variance = bn.get_weights()
    gamma[7], beta[7] = 0.0, -5.0
    bn.set_weights([gamma, beta, mean, variance])
    x = np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    scores = apoz(model, x, [prunable["block_5_expand"]])
    assert scores["block_5_expand"][7] == 1.0
    # ... is removed with its depthwise slice, and the outputs do not change.
    keep = {name: list(range(c.channels)) for name, c in prunable.items()}
    keep["block_5_expand"].remove(7)
    pruned = prune_channels(model, keep)
    assert pruned.get_layer("block_5_depthwise").get_weights()[0].shape[2] == 191
    assert pruned.count_params() < model.count_params()
    np.testing.assert_allclose(
        np.asarray(pruned(x, training=False)), np.asarray(model(x, training=False)), atol=1e-5
    )
