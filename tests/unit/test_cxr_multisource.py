"""The multi-source CXR assembly: perceptual hash, de-duplication, conflicts, patient splits."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dicomnode.training.cxr_multisource import (
    CLASSES,
    IEEE_SUBSET,
    KAGGLE_3CLASS,
    MULTISOURCE,
    assemble,
    hamming_matrix,
    phash,
    read_folders,
    report_markdown,
    write_manifest,
)
from tests.support import shared_data


def _film(seed: int, size: int = 256) -> np.ndarray:
    """A synthetic 'radiograph': smooth random blobs, distinct per seed."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(8, 8)).astype(np.float32)
    image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return image.astype(np.uint8)


def test_phash_survives_resize_squash_and_jpeg_but_separates_pictures(tmp_path: Path) -> None:
    film = _film(1, 384)[:, :300]
    squashed = cv2.resize(film, (640, 640), interpolation=cv2.INTER_LINEAR)
    Image.fromarray(squashed).save(tmp_path / "copy.jpg", quality=70)
    copy = np.asarray(Image.open(tmp_path / "copy.jpg").convert("L"))
    h_film, h_copy, h_other = phash(film), phash(copy), phash(_film(2, 384))
    distances = hamming_matrix([h_film, h_copy, h_other])
    assert distances[0, 1] <= 4
    assert distances[0, 2] > 16
    assert distances[0, 0] == 0
    with pytest.raises(Exception, match="2-D"):
        phash(np.zeros((4, 4, 3), np.uint8))


def _write(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(image).save(path)
    return path


def _constructed_root(tmp_path: Path) -> Path:
    """Three folders: a multisource set, an ieee8023 subset and a Kaggle set of copies."""
    root = tmp_path / "data"
    ms = root / MULTISOURCE
    rows = []
    seed = 100
    for source, label, patients in (
        ("nih_cxr14", "normal", 10),
        ("nih_cxr14", "pneumonia", 10),
        ("kermany_pediatric", "bacterial", 10),
        ("hannover_covid19", "covid19", 10),
    ):
        for p in range(patients):
            for k in range(2):  # two images per patient
                seed += 1
                name = f"{source}_{label}_{p}_{k}.png"
                _write(ms / "images", name, _film(seed))
                rows.append(
                    {
                        "path": f"images/{name}",
                        "source": source,
                        "patient_id": f"{label}{p}",
                        "label": label,
                        "view": "PA",
                        "sex": "",
                        "age": "",
                        "findings": "",
                        "original": "",
                        "width": "256",
                        "height": "256",
                        "licence": "CC0",
                    }
                )
    # The same patient holding both NIH classes (as 21 NIH patients do).
    rows[0]["patient_id"] = rows[20]["patient_id"] = "shared"
    with (ms / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ieee = root / IEEE_SUBSET
    ieee_rows = []
    for index, (label, film_seed) in enumerate(
        (("covid19", 500), ("viral_non_covid", 501), ("bacterial", 502), ("normal", 503))
    ):
        _write(ieee / "images", f"i{index}.png", _film(film_seed))
        ieee_rows.append(
            {
                "filename": f"i{index}.png",
                "label": label,
                "finding": "",
                "view": "PA",
                "modality": "X-ray",
                "patientid": str(index),
                "offset": "",
                "sex": "",
                "age": "40",
                "location": "",
                "license": "CC BY 4.0",
            }
        )
    # A conflict: the multisource hannover image 0 re-appears in ieee labelled normal.
    hannover_first = next(r for r in rows if r["source"] == "hannover_covid19")
    conflict = np.asarray(Image.open(ms / hannover_first["path"]))
    _write(ieee / "images", "conflict.png", conflict)
    ieee_rows.append({**ieee_rows[-1], "filename": "conflict.png", "patientid": "77"})
    with (ieee / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ieee_rows[0]))
        writer.writeheader()
        writer.writerows(ieee_rows)
    kaggle = root / KAGGLE_3CLASS
    k_rows = []
    # Copies (squashed to 640) of two ieee images, one relabelled "covid19" (the SARS one),
    # and one image that matches nothing.
    for name, film_seed, label in (
        ("Covid/a.png", 500, "covid19"),
        ("Covid/b.png", 501, "covid19"),
        ("Normal/c.png", 999, "normal"),
    ):
        image = cv2.resize(_film(film_seed), (640, 640))
        _write(kaggle / Path(name).parent, Path(name).name, image)
        k_rows.append(
            {
                "path": name,
                "split": "train",
                "label": label,
                "width": "640",
                "height": "640",
                "mode": "L",
                "md5": "",
            }
        )
    with (kaggle / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(k_rows[0]))
        writer.writeheader()
        writer.writerows(k_rows)
    return root


def test_assembly_on_constructed_folders(tmp_path: Path) -> None:
    root = _constructed_root(tmp_path)
    images = read_folders(root)
    assert len(images) == 80 + 5 + 3
    assembly = assemble(images, fractions=(0.6, 0.2, 0.2))
    reasons = Counter(d.reason.split(" (")[0] for d in assembly.dropped)
    # Both Kaggle copies are duplicates of ieee originals; the lone Kaggle image has no patient.
    assert reasons["duplicate picture"] == 2
    assert reasons["no patient id"] == 1
    # The hannover image and its ieee copy labelled normal: both copies dropped.
    assert reasons["label conflict between copies"] == 2
    # The Kaggle relabelling of the SARS (viral) image is overridden, not a conflict.
    assert any("'covid19' overridden by 'viral_non_covid'" in o for o in assembly.overrides)
    kept = {i.path.name: i for i in assembly.images}
    assert kept["i1.png"].label == "pneumonia" and kept["i1.png"].subtype == "viral"
    assert "a.png" not in kept and "conflict.png" not in kept
    # Patient-level splits: every group in exactly one split; the shared NIH patient too.
    by_group: dict[str, set[str]] = {}
    for image in assembly.images:
        by_group.setdefault(image.group, set()).add(image.split)
    assert all(len(s) == 1 for s in by_group.values())
    shared = [i for i in assembly.images if i.patient == "shared"]
    assert {i.label for i in shared} == {"normal", "pneumonia"} and len(
        {i.group for i in shared}
    ) == 1
    # Stratified by source and class: each (source, class) with 10 patients reaches every split.
    for source in ("nih_cxr14", "kermany_pediatric"):
        splits = {i.split for i in assembly.images if i.source == source}
        assert splits == {"train", "val", "test"}
    assert set(assembly.class_index().tolist()) <= set(range(len(CLASSES)))
    report = report_markdown(assembly)
    assert "label conflict between copies" in report and "| nih_cxr14 | normal |" in report
    write_manifest(assembly, tmp_path / "manifest.csv", root)
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open()))
    assert len(rows) == len(assembly.images)
    assert {"source", "patient", "view", "age_group", "licence", "split"} <= set(rows[0])


def test_assembly_is_deterministic(tmp_path: Path) -> None:
    root = _constructed_root(tmp_path)
    first = assemble(read_folders(root))
    second = assemble(read_folders(root))
    assert [(i.path, i.split) for i in first.images] == [(i.path, i.split) for i in second.images]


def test_real_folders_assemble_without_leaks() -> None:
    root = shared_data("cxr_multisource").parent
    assembly = assemble(read_folders(root))
    images = assembly.images
    assert len(images) > 3000
    by_group: dict[str, set[str]] = {}
    for image in images:
        by_group.setdefault(image.group, set()).add(image.split)
    assert all(len(s) == 1 for s in by_group.values())
    # The Kaggle COVID-19 images are ieee8023 copies: none is kept.
    assert not [i for i in images if i.folder == KAGGLE_3CLASS]
    dropped_kaggle = [d for d in assembly.dropped if d.image.folder == KAGGLE_3CLASS]
    assert sum(d.reason == "duplicate picture" for d in dropped_kaggle) >= 100
    # No picture twice: kept images' hashes within 4 bits are not identical thumbnails.
    thumbs = np.array([i.thumbnail for i in images])
    corr = thumbs @ thumbs.T / thumbs.shape[1]
    np.fill_diagonal(corr, 0)
    assert corr.max() < 0.97 + 1e-3
    sources = {i.source for i in images}
    assert {
        "nih_cxr14",
        "kermany_pediatric",
        "hannover_covid19",
        "ieee8023_covid_chestxray",
    } <= sources
    for split in ("train", "val", "test"):
        assert {i.label for i in images if i.split == split} == set(CLASSES)
