"""Linear heads, source debiasing, the shortcut check, calibration and the OOD gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.inference.cxr_domain import (
    DomainModel,
    MahalanobisGate,
    apply_temperature,
    fit_temperature,
    normalise_intensity,
    softmax,
)
from dicomnode.training.cxr_heads import (
    balance_weights,
    fit_softmax,
    shortcut_check,
    source_nuisance_projection,
)


def _sourced(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features where dims 0-1 carry the source (same for every class) and dim 2 the class."""
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 20))
    x[:, 0] += 4.0 * (sources == 1)
    x[:, 1] += 4.0 * (sources == 2)
    x[:, 2] += 1.5 * y
    return x, y, np.array([f"s{s}" for s in sources])


def test_balance_weights_equalise_cells() -> None:
    y = np.array([0, 0, 0, 1, 1, 0])
    s = ["a", "a", "a", "a", "b", "b"]
    w = balance_weights(y, s, "source_class")
    totals = {}
    for weight, label, source in zip(w, y, s, strict=True):
        totals[(source, label)] = totals.get((source, label), 0) + weight
    assert np.allclose(list(totals.values()), next(iter(totals.values())))
    assert np.isclose(w.mean(), 1.0)
    wc = balance_weights(y, s, "class")
    assert np.isclose(wc[y == 0].sum(), wc[y == 1].sum())
    assert np.all(balance_weights(y, s, "none") == 1)
    with pytest.raises(ValueError, match="unknown balancing"):
        balance_weights(y, s, "bogus")


def test_softmax_head_learns_and_folds_standardisation() -> None:
    x, y, _ = _sourced()
    x = x * 50 + 7  # raw scale far from standard: the folded head must still work
    head = fit_softmax(x, y, 2, l2=1.0)
    accuracy = (head.probabilities(x).argmax(axis=1) == y).mean()
    assert accuracy > 0.7
    assert np.allclose(head.probabilities(x).sum(axis=1), 1)


def test_nuisance_projection_hides_the_source_and_keeps_the_class() -> None:
    x, y, s = _sourced()
    xt, yt, st = _sourced(seed=1)
    before = shortcut_check(x, list(s), xt, list(st))
    assert before.accuracy > 0.9
    projection = source_nuisance_projection(x, y, list(s), 2)
    z = (x - x.mean(axis=0)) / x.std(axis=0) @ projection
    zt = (xt - x.mean(axis=0)) / x.std(axis=0) @ projection
    after = shortcut_check(z, list(s), zt, list(st))
    assert after.balanced_accuracy < 0.5  # chance is 1/3
    head = fit_softmax(x, y, 2, projection=projection)
    assert (head.probabilities(xt).argmax(axis=1) == yt).mean() > 0.7
    assert np.allclose(source_nuisance_projection(x, y, list(s), 0), np.eye(20))


def test_shortcut_check_reports_chance() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 5))
    s = list(rng.choice(["a", "b"], 300))
    result = shortcut_check(x[:200], s[:200], x[200:], s[200:])
    assert result.balanced_accuracy < 0.65
    assert result.as_dict()["chance_balanced_accuracy"] == 0.5


def test_temperature_is_recovered() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 3)) * 3
    y = np.array([rng.choice(3, p=p) for p in softmax(logits)])
    overconfident = softmax(logits * 2.5)  # a model 2.5x too sharp
    t = fit_temperature(overconfident, y)
    assert 2.2 < t < 2.8
    assert np.allclose(apply_temperature(overconfident, t), softmax(logits * 2.5 / t), atol=1e-4)
    with pytest.raises(ValueError):
        apply_temperature(overconfident, 0)


def test_gate_flags_far_images_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(800, 30))
    y = rng.integers(0, 3, 800)
    train[:, 0] += y * 3
    val = rng.normal(size=(400, 30))
    gate = MahalanobisGate.fit(train, y, components=10)
    assert gate.set_threshold(val, 0.99) == 1.0
    assert np.isfinite(gate.mahalanobis_scale) and np.isfinite(gate.residual_scale)
    assert gate.outside(val).mean() <= 0.025
    far = rng.normal(size=(50, 30)) + 8
    assert gate.outside(far).mean() == 1.0
    # Off the training subspace but with an ordinary projection: the residual catches it.
    directions = rng.normal(size=(5, 30))
    directions -= directions @ gate.basis @ gate.basis.T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    off = gate.centre + directions * 40
    _, residual = gate.distances(off)
    assert np.all(residual > gate.residual_scale)
    assert gate.outside(off).all()
    domain = DomainModel(
        normalisation="equalise",
        temperature=1.7,
        gate=gate,
        subtype_kernel=rng.normal(size=(30, 2)),
        subtype_bias=np.zeros(2),
        operating_points={"covid19": 0.6, "pneumonia": 0.4},
    )
    domain.save(tmp_path)
    loaded = DomainModel.load(tmp_path)
    assert loaded.normalisation == "equalise" and loaded.temperature == 1.7
    assert loaded.operating_points == {"covid19": 0.6, "pneumonia": 0.4}
    assert np.allclose(loaded.gate.score(val), gate.score(val), rtol=1e-4)
    assert loaded.viral_probability(val).shape == (400,)
    with pytest.raises(FileNotFoundError):
        DomainModel.load(tmp_path / "absent")


def test_intensity_normalisation() -> None:
    dark = (np.arange(256, dtype=np.uint8).reshape(16, 16) // 4).astype(np.uint8)
    out = normalise_intensity(dark, "equalise")
    assert out.max() == 255 and out.dtype == np.uint8
    assert normalise_intensity(dark, "none") is dark
    with pytest.raises(ValueError):
        normalise_intensity(dark.astype(np.float32))
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise_intensity(dark, "clahe9")
