"""The CXR ensemble recipe's pieces that need no data: weight fitting, manifest weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicomnode.inference.registry import read_manifest
from dicomnode.training.recipes.cxr import fit_weights, set_ensemble_weight


def _probabilities(y: np.ndarray, quality: float, seed: int) -> np.ndarray:
    """Class probabilities that favour the true class by ``quality`` plus noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(y.size, 3)) + quality * np.eye(3)[y]
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_the_weights_favour_the_informative_member_and_sum_to_one() -> None:
    y = np.arange(60) % 3
    members = np.stack(
        [_probabilities(y, 0.0, 1), _probabilities(y, 3.0, 2), _probabilities(y, 0.0, 3)]
    )
    weights = fit_weights(members, y, step=0.1)
    assert abs(sum(weights) - 1.0) < 1e-9
    assert weights[1] == max(weights) and weights[1] >= 0.5


def test_identical_members_get_equal_weights_on_the_grid() -> None:
    y = np.arange(30) % 3
    p = _probabilities(y, 1.0, 4)
    weights = fit_weights(np.stack([p, p]), y, step=0.25)
    assert weights == [0.5, 0.5]


def test_set_ensemble_weight_replaces_or_adds_the_table(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    body = (
        'name = "m"\nversion = "1"\ntask = "classifier"\narchitecture = "x"\n'
        'device_uid = "1.2.3"\n\n[weights]\nfile = "w.keras"\nformat = "keras"\n'
        f'sha256 = "{"0" * 64}"\n\n[input]\nsize = [8, 8]\nchannels = 3\n'
    )
    classes = (
        '\n[[classes]]\nname = "a"\ncode_value = "1"\ncoding_scheme = "SCT"\n'
        'code_meaning = "A"\n\n[[classes]]\nname = "b"\ncode_value = "2"\n'
        'coding_scheme = "SCT"\ncode_meaning = "B"\n'
    )
    manifest.write_text(body + "\n[ensemble]\nweight = 0.25\n" + classes)
    set_ensemble_weight(manifest, 0.6)
    assert read_manifest(manifest).ensemble_weight == 0.6
    assert manifest.read_text().count("[ensemble]") == 1
    manifest.write_text(body + classes)
    set_ensemble_weight(manifest, 0.15)
    spec = read_manifest(manifest)
    assert spec.ensemble_weight == 0.15 and spec.class_names == ["a", "b"]


def test_the_concatenated_meta_learner_equals_the_three_input_one() -> None:
    """``stacking_meta(concatenated=True)`` is the seed's meta-learner on one input, the
    members' outputs concatenated as the node's ensemble passes them."""
    from dicomnode.nets import stacking_meta

    split = stacking_meta(3, 3)
    joined = stacking_meta(3, 3, concatenated=True)
    assert joined.input_shape == (None, 9)
    for name in ("meta_hidden", "meta_predictions"):
        joined.get_layer(name).set_weights(split.get_layer(name).get_weights())
    p = np.random.default_rng(0).dirichlet(np.ones(3), size=(3, 5)).astype(np.float32)
    expected = split.predict([p[0], p[1], p[2]], verbose=0)
    actual = joined.predict(np.concatenate(list(p), axis=1), verbose=0)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
