"""The 3-class CXR set: near-duplicates found across sources, splits by merged patient group."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from support import shared_data

from dicomnode.training import TrainingError
from dicomnode.training.cxr_data import (
    CLASS_NAMES,
    CXR_CLASSES,
    DUPLICATE_CORRELATION,
    LEGACY_SOURCES,
    duplicate_sets,
    load_cxr_set,
    lung_crops,
    thumbnail,
)
from dicomnode.training.data import SPLITS


def _chest_like(seed: int) -> np.ndarray:
    """A smooth random grey picture (distinct seeds give unrelated pictures)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 6), dtype=np.uint8)
    return cv2.resize(small, (300, 400), interpolation=cv2.INTER_CUBIC)


def test_a_squeezed_recompressed_copy_is_a_duplicate_and_other_pictures_are_not() -> None:
    original = _chest_like(1)
    squeezed = cv2.resize(original, (640, 640), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", squeezed, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok
    copy = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    others = [_chest_like(seed) for seed in (2, 3)]
    thumbs = np.stack([thumbnail(img) for img in (original, copy, *others)])
    roots = duplicate_sets(thumbs)
    assert roots[0] == roots[1]
    assert len({roots[0], roots[2], roots[3]}) == 3


def test_duplicates_chain_into_one_set() -> None:
    base = np.random.default_rng(0).standard_normal(16)
    near = base + 0.01
    nearer = near + 0.01
    far = np.random.default_rng(1).standard_normal(16)
    thumbs = np.stack([(v - v.mean()) / v.std() for v in (base, far, nearer, near)])
    assert duplicate_sets(thumbs) == [0, 1, 0, 0]


def test_class_order_and_codes() -> None:
    assert CLASS_NAMES == ("pneumonia", "covid19", "normal")
    assert [c.code_value for c in CXR_CLASSES] == ["233604007", "840539006", "17621005"]
    assert all(c.coding_scheme == "SCT" for c in CXR_CLASSES)


@pytest.fixture(scope="module")
def cxr_set():  # type: ignore[no-untyped-def]
    root = shared_data("cxr_classification")
    return load_cxr_set(root.parent, 32)


def test_no_picture_is_in_two_splits_and_patients_stay_together(cxr_set) -> None:  # type: ignore[no-untyped-def]
    images = cxr_set.images
    # Every kept image is a distinct picture (its near-duplicates were merged away), so
    # no picture can be in two splits under two names; re-measured from the files.
    from dicomnode.training.data import read_grey

    full = np.stack([thumbnail(read_grey(image.path)) for image in images])
    correlation = full @ full.T / full.shape[1]
    np.fill_diagonal(correlation, 0.0)
    pairs = np.argwhere(correlation >= DUPLICATE_CORRELATION)
    assert [(images[i].path.name, images[j].path.name) for i, j in pairs] == []
    split_of: dict[str, str] = {}
    for image in images:
        assert split_of.setdefault(image.group, image.split) == image.split
        if image.source == "ieee8023":
            assert image.group.startswith("ieee8023:")


def test_the_split_is_deterministic_and_covers_every_class(cxr_set) -> None:  # type: ignore[no-untyped-def]
    again = load_cxr_set(shared_data("cxr_classification").parent, 32)
    assert [(i.path, i.split) for i in again.images] == [(i.path, i.split) for i in cxr_set.images]
    counts = cxr_set.class_counts()
    for split in ("train", "val", "test"):
        assert all(counts[split][name] >= 10 for name in CLASS_NAMES), counts
    # The 3-class set's copies of ieee8023 pictures were dropped, ieee8023 labels kept.
    assert cxr_set.duplicates_dropped >= 15
    assert cxr_set.label_conflicts >= 10


def test_the_adult_normals_join_without_moving_any_other_image(cxr_set) -> None:  # type: ignore[no-untyped-def]
    """The NLM normals are a stratum of their own: the two other sources keep exactly the
    splits they had without them (so earlier test images stay test images)."""
    without = load_cxr_set(shared_data("cxr_classification").parent, 32, sources=LEGACY_SOURCES)
    before = {image.path: image.split for image in without.images}
    after = {image.path: image.split for image in cxr_set.images if image.source != "nlm"}
    assert after == before
    nlm = [image for image in cxr_set.images if image.source == "nlm"]
    assert len(nlm) == 60
    assert {image.label for image in nlm} == {CLASS_NAMES.index("normal")}
    assert all(image.group == f"nlm:{image.path.name}" for image in nlm)
    assert all(image.path.name.endswith("_0.png") for image in nlm)  # NLM's normal suffix
    per_split = {split: sum(image.split == split for image in nlm) for split in SPLITS}
    assert per_split == {"train": 36, "val": 12, "test": 12}


def test_an_unknown_source_is_refused_with_its_value(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainingError, match="'kermany'"):
        load_cxr_set(tmp_path, 32, sources=("ieee8023", "kermany"))


def test_an_unknown_crop_is_refused_with_its_value(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainingError, match="'middle'"):
        load_cxr_set(tmp_path, 32, crop="middle")


def test_lung_crops_are_the_pipelines_crops_and_are_cached(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Training's crops come from the CXR pipeline's functions with the shipped lung model;
    a second call reads them back from the cache instead of predicting again."""
    from dicomnode.inference.lung import lung_crop, lung_masks
    from dicomnode.inference.registry import load_model

    lungs = cv2.GaussianBlur(np.full((400, 300), 200, np.uint8), (5, 5), 0)
    cv2.ellipse(lungs, (95, 200), (50, 120), 0, 0, 360, 40, -1)
    cv2.ellipse(lungs, (205, 200), (50, 120), 0, 0, 360, 40, -1)
    images = [lungs, _chest_like(4)]
    crops, spec = lung_crops(images, ["a.png", "b.png"], 64, cache_dir=tmp_path)
    assert crops.shape == (2, 64, 64) and crops.dtype == np.uint8
    assert spec.name == "cxr-lung-unet"
    model = load_model(spec)
    masks = lung_masks(images, spec, lambda x: np.asarray(model.predict(x, verbose=0)))
    for image, mask, made in zip(images, masks, crops, strict=True):
        np.testing.assert_array_equal(made, lung_crop(image, mask, 64)[1])
    [cache] = tmp_path.glob("*.npz")
    assert cache.name == f"{spec.sha256[:16]}-64.npz"
    again, _ = lung_crops([np.zeros_like(lungs)], ["b.png"], 64, cache_dir=tmp_path)
    np.testing.assert_array_equal(again[0], crops[1])  # read back, not recomputed
