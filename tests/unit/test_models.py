"""Model registry (manifests, checksums, .keras and Keras 2 .h5) and Grad-CAM."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from dicomnode.inference.gradcam import GradCAM  # noqa: E402
from dicomnode.inference.registry import (  # noqa: E402
    ModelError,
    load_model,
    read_manifest,
    sha256_of,
)

CLASSES = """
[[classes]]
name = "bacterial"
code_value = "53084003"
coding_scheme = "SCT"
code_meaning = "Bacterial pneumonia"

[[classes]]
name = "covid19"
code_value = "840539006"
coding_scheme = "SCT"
code_meaning = "COVID-19"

[[classes]]
name = "normal"
code_value = "17621005"
coding_scheme = "SCT"
code_meaning = "Normal"
"""


def _tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(3, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs, name="tiny")


def _manifest(folder: Path, weights: Path, fmt: str, sha: str | None = None, **extra: str) -> Path:
    text = (
        textwrap.dedent(
            f"""
        name = "tiny"
        version = "0.0.1"
        task = "classifier"
        architecture = "test"
        device_uid = "1.2.826.0.1.3680043.10.1234.1"
        {extra.get("head", "")}
        [weights]
        file = "{weights.name}"
        format = "{fmt}"
        sha256 = "{sha or sha256_of(weights)}"

        [input]
        size = [16, 16]
        channels = 3

        [ensemble]
        weight = 0.5

        [gradcam]
        layer = "last_conv"
        """
        )
        + CLASSES
    )
    path = folder / "manifest.toml"
    path.write_text(text)
    return path


def test_keras_file_loads_through_its_manifest(tmp_path: Path) -> None:
    model = _tiny_classifier()
    weights = tmp_path / "tiny.keras"
    model.save(weights)
    spec = read_manifest(_manifest(tmp_path, weights, "keras"))
    assert spec.class_names == ["bacterial", "covid19", "normal"]
    assert spec.classes[1].code_value == "840539006"
    assert spec.ensemble_weight == 0.5 and spec.gradcam_layer == "last_conv"
    assert (spec.crop, spec.normalisation) == ("lung", "none")  # the defaults
    loaded = load_model(spec)
    x = np.random.default_rng(1).random((2, 16, 16, 3)).astype("float32")
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_checksum_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.keras"
    _tiny_classifier().save(weights)
    spec = read_manifest(_manifest(tmp_path, weights, "keras", sha="0" * 64))
    with pytest.raises(ModelError) as info:
        load_model(spec)
    assert "sha256" in str(info.value) and "0" * 64 in str(info.value)
    assert "tiny.keras" in str(info.value)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (('task = "classifier"', 'task = "guess"'), "'guess'"),
        (("size = [16, 16]", "size = [16]"), "[16]"),
        (("channels = 3", "channels = 2"), "2"),
        (('device_uid = "1.2.826.0.1.3680043.10.1234.1"', 'device_uid = "x.y"'), "'x.y'"),
        (('format = "keras"', 'format = "onnx"'), "'onnx'"),
        (("channels = 3", 'channels = 3\ncrop = "heart"'), "'heart'"),
        (("channels = 3", 'channels = 3\nnormalisation = "clahe"'), "'clahe'"),
    ],
)
def test_manifest_mistakes_name_key_and_value(
    tmp_path: Path, mutation: tuple[str, str], message: str
) -> None:
    weights = tmp_path / "w.keras"
    weights.write_bytes(b"x")
    path = _manifest(tmp_path, weights, "keras")
    path.write_text(path.read_text().replace(*mutation))
    with pytest.raises(ModelError) as info:
        read_manifest(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_keras2_full_model_h5_loads_and_predicts_the_same(tmp_path: Path) -> None:
    """An .h5 written by Keras 2 (tf_keras), as the seed authors published theirs."""
    pytest.importorskip("tf_keras", reason="tf_keras (Keras 2) is needed to write a Keras 2 file")
    weights = tmp_path / "keras2.h5"
    inputs = tmp_path / "x.npy"
    expected = tmp_path / "y.npy"
    np.save(inputs, np.random.default_rng(3).random((2, 16, 16, 3)).astype("float32"))
    script = textwrap.dedent(
        f"""
        import numpy as np, tf_keras as k
        k.utils.set_random_seed(5)
        i = k.Input((16, 16, 3))
        x = k.layers.Conv2D(4, 3, activation="relu", name="conv1")(i)
        x = k.layers.Conv2D(3, 3, activation="relu", name="last_conv")(x)
        x = k.layers.ZeroPadding2D(1)(x)
        x = k.layers.GlobalAveragePooling2D()(x)
        x = k.layers.Dropout(0.5)(x)
        o = k.layers.Dense(3, activation="softmax")(x)
        m = k.Model(i, o)
        m.compile(optimizer="adam", loss="categorical_crossentropy")
        m.save({str(weights)!r})
        np.save({str(expected)!r}, m.predict(np.load({str(inputs)!r}), verbose=0))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    spec = read_manifest(_manifest(tmp_path, weights, "h5-model"))
    model = load_model(spec)
    got = model.predict(np.load(inputs), verbose=0)
    assert np.allclose(got, np.load(expected), atol=1e-6)


def test_gradcam_matches_an_independent_finite_difference_computation() -> None:
    model = _tiny_classifier()
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    cams = GradCAM(model, "last_conv")(images, class_index=[1, 2])
    assert cams.shape == (2, 12, 12)
    assert cams.min() >= 0 and cams.max() <= 1

    # Independently: activations A of last_conv, the tail as plain numpy
    # (GAP -> Dense -> softmax), gradients by central differences.
    features = keras.Model(model.inputs, model.get_layer("last_conv").output)
    activations = features.predict(images, verbose=0).astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("scores").get_weights())

    def score(a: np.ndarray, c: int) -> float:
        logits = a.mean(axis=(0, 1)) @ kernel + bias
        e = np.exp(logits - logits.max())
        return float(e[c] / e.sum())

    for b, c in ((0, 1), (1, 2)):
        a = activations[b]
        grads = np.zeros_like(a)
        eps = 1e-4
        for idx in np.ndindex(a.shape):
            up, down = a.copy(), a.copy()
            up[idx] += eps
            down[idx] -= eps
            grads[idx] = (score(up, c) - score(down, c)) / (2 * eps)
        weights = grads.mean(axis=(0, 1))
        cam = np.maximum((a * weights).sum(axis=2), 0)
        cam = cam / cam.max() if cam.max() > 0 else cam
        assert np.allclose(cams[b], cam, atol=1e-3)


def test_gradcam_refuses_a_layer_not_followed_by_a_chain() -> None:
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(2, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(2, 3, padding="same", name="b")(a)
    merged = keras.layers.Add(name="skip")([a, b])
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(merged))
    with pytest.raises(ValueError, match="chain"):
        GradCAM(keras.Model(inputs, out), "a")


def test_weights_only_h5_loads_into_its_architecture(tmp_path: Path) -> None:
    from dicomnode.nets import ARCHITECTURES

    builder = {"input_size": 32, "width": 2, "dense_units": 4}
    model = ARCHITECTURES["small_cnn"](**builder)
    weights = tmp_path / "tiny.weights.h5"
    model.save_weights(weights)
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        textwrap.dedent(
            f"""
            name = "tiny-cnn"
            version = "1"
            task = "ct-classifier"
            architecture = "small_cnn"
            device_uid = "1.2.826.0.1.3680043.10.1234.2"
            [weights]
            file = "{weights.name}"
            format = "h5-weights"
            sha256 = "{sha256_of(weights)}"
            [input]
            size = [32, 32]
            channels = 1
            [builder]
            input_size = 32
            width = 2
            dense_units = 4
            """
        )
    )
    loaded = load_model(read_manifest(manifest))
    x = np.random.default_rng(2).random((3, 32, 32, 1)).astype("float32")
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    manifest.write_text(manifest.read_text().replace('"small_cnn"', '"resnet9000"'))
    with pytest.raises(ModelError, match="'resnet9000'"):
        load_model(read_manifest(manifest))


def test_mixed_precision_computes_in_float16_with_float32_weights_and_outputs(
    tmp_path: Path,
) -> None:
    """``mixed_precision = true``: every hidden layer of a loaded model computes in float16
    (a saved model keeps its float32 policy unless it is converted), its variables and its
    output layer stay float32, and the predictions match the float32 model's."""
    from fixture_models import write_cxr_models

    from dicomnode.inference.registry import to_mixed_precision, use_mixed_precision
    from dicomnode.nets import lung_unet

    root = write_cxr_models(tmp_path / "models")
    spec = read_manifest(root / "m1" / "manifest.toml")
    cases = [
        (load_model(spec), load_model(spec, mixed_precision=True), spec.input_size, 3),
    ]
    unet = lung_unet(input_size=64, width=4)  # the seed's U-Net, small
    cases.append((unet, to_mixed_precision(unet), (64, 64), 1))
    for plain, mixed, size, channels in cases:
        assert all(layer.compute_dtype == "float32" for layer in plain.layers)
        output_layers = {t._keras_history[0].name for t in mixed.outputs}
        hidden = [
            layer
            for layer in mixed.layers
            if layer.name not in output_layers and not isinstance(layer, keras.layers.InputLayer)
        ]
        assert hidden and all(layer.compute_dtype == "float16" for layer in hidden)
        assert all(w.dtype == "float32" for layer in hidden for w in layer.weights)
        assert all(mixed.get_layer(n).compute_dtype == "float32" for n in output_layers)
        x = np.random.default_rng(0).random((2, *size, channels), np.float32)
        out = np.asarray(mixed.predict(x, verbose=0))
        assert out.dtype == np.float32
        assert np.allclose(out, plain.predict(x, verbose=0), atol=2e-2)
    assert use_mixed_precision(True, "tensorflow on 1 GPU(s)")
    assert use_mixed_precision(True, "jax on gpu")
    assert not use_mixed_precision(True, "tensorflow on CPU")  # no fast float16 there
    assert not use_mixed_precision(False, "jax on gpu")
