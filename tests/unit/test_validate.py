"""``dicomnode validate``: the node's CXR pipeline on labelled files, with the outputs a site
reads (predictions.csv, report.md, plots) and clear reasons for the files it cannot use.

Constructed data with tiny fixture models (plumbing), then the default configuration's
shipped models on real labelled images from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import dicom_files, make_instance, shared_data

keras = pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")

from fixture_models import write_cxr_models  # noqa: E402

from dicomnode.cli import main  # noqa: E402
from dicomnode.config import CXRSettings, RoutingSettings  # noqa: E402
from dicomnode.pipelines.cxr import CXRPipeline  # noqa: E402
from dicomnode.training.validate import ValidateError, read_labels, run_validation  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _write_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.zeros((128, 112), np.uint8)
    image[16:112, 12:50] = 200
    image[16:112, 62:100] = 200
    image += rng.integers(0, 40, image.shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> CXRPipeline:
    models = write_cxr_models(tmp_path_factory.mktemp("models"))
    settings = CXRSettings(
        models_dir=models,
        lung_mask="lung",
        members=("m1", "m2", "m3"),
        strategy="mean",
        explain_member="m1",
        detector="",
        batch_size=4,
    )
    p = CXRPipeline(settings, RoutingSettings())
    p.load()
    return p


def test_constructed_set_with_bad_rows(pipeline: CXRPipeline, tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i in range(6):
        _write_png(images / "png" / f"{i}.png", i)
    dicom = make_instance(images / "dcm", modality="CR", rows=96, columns=80)
    dicom = dicom.rename(dicom.with_suffix(""))  # a DICOM file without an extension
    (images / "broken.png").write_bytes(b"not an image at all")
    labels = tmp_path / "labels.csv"
    rows = [(f"png/{i}.png", ("normal", "covid19", "bacterial")[i % 3]) for i in range(6)]
    rows += [
        (str(dicom.relative_to(images)), "Normal"),  # labels are case-insensitive
        ("png/missing.png", "normal"),
        ("png/0.png", "pneumothorax"),
        ("broken.png", "normal"),
    ]
    labels.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    out = tmp_path / "out"
    result = run_validation(pipeline, images, labels, out, progress=False)

    assert len(result.rows) == 7
    reasons = {p.path: p.reason for p in result.problems}
    assert reasons["png/missing.png"] == "file not found"
    assert "unknown label 'pneumothorax'" in reasons["png/0.png"]
    assert reasons["broken.png"].startswith("unreadable image")
    with (out / "predictions.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["path"] for r in table] == [p for p, _ in rows[:7]]
    assert set(table[0]) >= {"path", "label", "p_bacterial", "p_covid19", "p_normal"}
    assert {"outside_domain", "domain_score", "boxes"} <= set(table[0])
    for row in table:
        total = sum(float(row[f"p_{c}"]) for c in ("bacterial", "covid19", "normal"))
        assert total == pytest.approx(1.0, abs=1e-4)
    # The probabilities are the pipeline's own on the same pixels.
    [direct] = pipeline.analyse_images(
        [("x", _image8(cv2.imread(str(images / "png" / "3.png"), cv2.IMREAD_GRAYSCALE)))]
    )
    assert float(table[3]["p_covid19"]) == pytest.approx(direct.probabilities["covid19"], abs=1e-5)
    report = (out / "report.md").read_text()
    assert "## Confusion table" in report and "## ROC AUC" in report
    assert "broken.png" in report and "file not found" in report
    assert (out / "roc.png").stat().st_size > 0 and (out / "reliability.png").stat().st_size > 0
    counts = [
        int(v)
        for line in report.splitlines()
        if line.startswith("| **")
        for v in line.split("|")[2:-1]
    ]
    assert sum(counts) == 7  # every analysed image once in the confusion table


def _image8(grey: np.ndarray):  # type: ignore[no-untyped-def]
    from dicomnode.imaging import Image8

    return Image8(grey, grey.shape[0], grey.shape[1], None, None, "MONOCHROME2", "", 1, "file")


def test_labels_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidateError, match="labels file not found"):
        read_labels(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,normal\n")
    with pytest.raises(ValidateError, match="path,label"):
        read_labels(bad)


def test_cli_default_config_on_real_images(tmp_path: Path) -> None:
    """The command with the repository's config.toml (the shipped cxr-mobilenetv2) on real
    labelled images: a few of each class from cxr_multisource and the shared chest DICOMs."""
    root = shared_data("cxr_multisource")
    with (root / "labels.csv").open() as handle:
        listed = list(csv.DictReader(handle))
    picked: list[tuple[str, str]] = []
    for label in ("normal", "pneumonia", "covid19"):
        picked += [(r["path"], label) for r in listed if r["label"] == label][:3]
    images = tmp_path / "images"
    for path, _ in picked:
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / path, images / path)
    chest = [f for f in dicom_files(shared_data("dicom_cxr", "chest")) if f.suffix == ".dcm"][:1]
    for f in chest:
        shutil.copy(f, images / f.name)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,label\n"
        + "".join(f"{p},{lab}\n" for p, lab in picked)
        + "".join(f"{f.name},normal\n" for f in chest)
        + "nothing/here.png,normal\n"
    )
    out = tmp_path / "out"
    config = REPO / "config.toml"
    code = main(
        [
            "validate",
            "--config",
            str(config),
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    with (out / "predictions.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(picked) + len(chest)
    assert {"p_pneumonia", "p_covid19", "p_normal", "covid19_present", "pneumonia_present"} <= set(
        table[0]
    )
    for row in table:
        if row["outside_domain"] == "False":
            present = float(row["p_covid19"]) >= 0.3927762106948587
            assert row["covid19_present"] == str(present)
    report = (out / "report.md").read_text()
    assert "sensitivity" in report and "nothing/here.png" in report
