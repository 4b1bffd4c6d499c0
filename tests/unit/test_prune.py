"""APoZ pruning on tiny random classifiers: fewer parameters, same outputs shape, exact weights."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from dicomnode.nets import inceptionv3_classifier, vgg16_classifier
from dicomnode.training.prune import (
    PruneError,
    apoz,
    choose_channels,
    iterative_prune,
    prunable_convolutions,
    prune_channels,
)

SIZE = 96


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, SIZE, SIZE, 3), dtype=np.float32)


def _vgg() -> keras.Model:
    keras.utils.set_random_seed(1)
    return vgg16_classifier(input_size=SIZE, width_multiplier=0.0625, head_channels=8)


def _inception() -> keras.Model:
    keras.utils.set_random_seed(2)
    return inceptionv3_classifier(input_size=96, width_multiplier=0.125, head_channels=8)


def _kill_channel(model: keras.Model, conv: str, channel: int) -> None:
    """Make ``channel`` of ``conv`` zero after its ReLU for every input."""
    layer = model.get_layer(conv)
    weights = layer.get_weights()
    weights[0][..., channel] = 0.0
    if layer.use_bias:
        weights[1][channel] = -1.0
        layer.set_weights(weights)
        return
    layer.set_weights(weights)
    bn = model.get_layer(conv.removesuffix("_conv") + "_bn")
    bn_weights = bn.get_weights()  # beta, moving mean, moving variance (scale=False)
    bn_weights[0][channel] = -5.0
    bn.set_weights(bn_weights)


def _all_but(model: keras.Model, conv: str, channel: int) -> dict[str, list[int]]:
    keep = {c.conv: list(range(c.channels)) for c in prunable_convolutions(model)}
    keep[conv] = [c for c in keep[conv] if c != channel]
    return keep


def test_every_vgg_convolution_and_the_head_are_prunable() -> None:
    model = _vgg()
    names = [c.conv for c in prunable_convolutions(model)]
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert names == convs
    assert "extra_conv1_vgg16" in names and "block5_conv3" in names


def test_inception_branch_convolutions_are_measured_after_their_batchnorm_relu() -> None:
    found = {c.conv: c.activation for c in prunable_convolutions(_inception())}
    assert found["stem1_conv"] == "stem1"
    assert found["mini_mixed0_1x1_conv"] == "mini_mixed0_1x1"
    assert found["extra_conv1_inceptionv3"] == "extra_conv1_inceptionv3"


@pytest.mark.parametrize(
    ("build", "conv"),
    [
        (_vgg, "block2_conv1"),
        (_vgg, "extra_conv1_vgg16"),
        (_inception, "stem2_conv"),  # feeds every branch of the first mixed block
        (_inception, "mini_mixed0_1x1_conv"),  # a slice of a concatenation
        (_inception, "mixed10_3x3b_conv"),  # the Grad-CAM concatenation feeds the head
    ],
)
def test_removing_a_dead_channel_leaves_the_outputs_unchanged(build, conv: str) -> None:
    model = build()
    _kill_channel(model, conv, 1)
    images = np.random.default_rng(0).random((4, *model.input_shape[1:]), dtype=np.float32)
    assert apoz(model, images)[conv][1] == 1.0
    pruned = prune_channels(model, _all_but(model, conv, 1))
    assert pruned.count_params() < model.count_params()
    assert pruned.get_layer(conv).output.shape[-1] == model.get_layer(conv).output.shape[-1] - 1
    before = model.predict(images, verbose=0)
    after = pruned.predict(images, verbose=0)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_surviving_channels_keep_their_exact_weights() -> None:
    model = _vgg()
    keep = {c.conv: list(range(c.channels)) for c in prunable_convolutions(model)}
    keep["block1_conv1"] = [0, 2, 3]
    keep["block1_conv2"] = [1, 3]
    pruned = prune_channels(model, keep)
    old1, new1 = model.get_layer("block1_conv1"), pruned.get_layer("block1_conv1")
    np.testing.assert_array_equal(new1.get_weights()[0], old1.get_weights()[0][..., [0, 2, 3]])
    np.testing.assert_array_equal(new1.get_weights()[1], old1.get_weights()[1][[0, 2, 3]])
    old2, new2 = model.get_layer("block1_conv2"), pruned.get_layer("block1_conv2")
    expected = old2.get_weights()[0][:, :, [0, 2, 3], :][..., [1, 3]]
    np.testing.assert_array_equal(new2.get_weights()[0], expected)
    # The next block's input channels follow block1_conv2's kept channels.
    old3, new3 = model.get_layer("block2_conv1"), pruned.get_layer("block2_conv1")
    np.testing.assert_array_equal(new3.get_weights()[0], old3.get_weights()[0][:, :, [1, 3], :])
    assert [layer.name for layer in pruned.layers] == [layer.name for layer in model.layers]


def test_the_dense_rows_follow_the_pruned_head() -> None:
    model = _vgg()
    keep = {c.conv: list(range(c.channels)) for c in prunable_convolutions(model)}
    keep["extra_conv1_vgg16"] = [0, 5, 7]
    pruned = prune_channels(model, keep)
    dense_old = model.get_layer("predictions").get_weights()[0]
    np.testing.assert_array_equal(
        pruned.get_layer("predictions").get_weights()[0], dense_old[[0, 5, 7]]
    )


def test_global_ranking_takes_the_highest_apoz_and_keeps_a_floor() -> None:
    scores = {
        "a": np.array([0.1, 0.9, 0.95, 0.2]),
        "b": np.array([0.99, 0.98, 0.5, 0.97]),
    }
    keep = choose_channels(scores, 3, {"a": 4, "b": 4}, min_keep=0.0)
    assert keep["a"].tolist() == [0, 1, 2, 3]
    assert keep["b"].tolist() == [2]
    keep = choose_channels(scores, 4, {"a": 4, "b": 4}, min_keep=0.5)
    assert keep["b"].tolist() == [2, 3]  # the floor stops b at 2 channels (0.97 stays)
    assert keep["a"].tolist() == [0, 3]  # so a gives its 0.95 and 0.9


def test_a_convolution_feeding_an_add_is_not_prunable() -> None:
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(a)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    assert prunable_convolutions(model) == []
    with pytest.raises(PruneError, match="not a prunable convolution"):
        prune_channels(model, {"a": [0, 1]})


def test_iterative_pruning_records_each_step_and_keeps_the_best(tmp_path: Path) -> None:
    model = _vgg()
    metrics = iter([0.90, 0.92, 0.91, 0.915, 0.80])
    tuned: list[int] = []

    def fine_tune(candidate: keras.Model, step: int) -> keras.Model:
        tuned.append(step)
        return candidate

    result = iterative_prune(
        model,
        _images(),
        fine_tune,
        lambda _: next(metrics),
        step=0.1,
        max_fraction=0.4,
        work_dir=tmp_path,
    )
    assert [s.step for s in result.steps] == [0, 1, 2, 3, 4]
    assert tuned == [1, 2, 3, 4]
    params = [s.parameters for s in result.steps]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]
    assert result.best_step == 1  # the best validation metric, as the seed
    assert result.model.count_params() == result.steps[1].parameters
    assert "| 1 |" in result.table() and "**kept**" in result.table()
    # Within a tolerance, the most pruned step close to the best is kept instead.
    again = iterative_prune(
        model, _images(), fine_tune, lambda _: 0.0, step=0.1, max_fraction=0.4,
        tolerance=0.01, work_dir=tmp_path,
    )  # fmt: skip
    assert again.best_step == 3  # resumed from the saved steps: 0.915 is within 0.01
    assert tuned == [1, 2, 3, 4]  # nothing was fine-tuned again
