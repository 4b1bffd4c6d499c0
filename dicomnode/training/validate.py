"""Site acceptance testing: ``dicomnode validate --images DIR --labels CSV --out DIR``.

What a hospital runs on its own labelled cases before it trusts the node. The labelled
files (DICOM, PNG or JPEG, listed in a CSV with columns ``path,label``, paths relative to
``--images``) go through the node's own CXR pipeline, built from the node's configuration
exactly as a worker builds it (:class:`dicomnode.pipelines.cxr.CXRPipeline`: the same
decoding of DICOM files, :func:`dicomnode.imaging.to_uint8`, PNG/JPEG by their luminance;
the same lung mask, classifiers, out-of-domain gate, operating points and boxes; no
routing: the site chose the images). Written to ``--out``:

* ``predictions.csv``: ``path``, ``label``, one ``p_<class>`` column per class, the
  out-of-domain flag and score, each finding at its operating point, and the boxes
  (``x y width height confidence`` in source pixels, ``;``-separated);
* ``report.md`` with ``roc.png`` and ``reliability.png``: ROC AUC per class (one vs rest),
  sensitivity and specificity at the configured operating point with 95 % Wilson
  intervals, the confusion table (true label against the most probable class), and every
  file that could not be used (missing, unknown label, unreadable) with its reason. Images
  outside the validated domain are counted and left out of the metrics (the node reports
  no findings for them).

A bad row never stops the run: it is listed and the others go on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import DicomNodeError

#: Images per pipeline call.
CHUNK = 16
#: Files read as pictures (PNG/JPEG); any other file is decoded as DICOM, as the node does.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ValidateError(DicomNodeError):
    """The run cannot start (no labels file, no usable row)."""


@dataclass
class Problem:
    """A listed file the run could not use, and why."""

    path: str
    reason: str


@dataclass
class Validation:
    """What a run measured (also written to ``report.md``)."""

    classes: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    operating_points: dict[str, float] = field(default_factory=dict)


def read_labels(path: Path) -> list[tuple[int, str, str]]:
    """``(line, path, label)`` of the CSV's rows (header ``path,label``)."""
    if not path.is_file():
        raise ValidateError(f"labels file not found: {str(path)!r}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "path" not in fields or "label" not in fields:
            raise ValidateError(
                f"{path}: the first line must name the columns path,label; got {fields}"
            )
        reader.fieldnames = fields
        return [
            (number, (row.get("path") or "").strip(), (row.get("label") or "").strip().lower())
            for number, row in enumerate(reader, start=2)
        ]


def _boxes(boxes: Sequence[Any]) -> str:
    return ";".join(
        f"{b.x:.1f} {b.y:.1f} {b.width:.1f} {b.height:.1f} "
        + ("" if b.confidence is None else f"{b.confidence:.4f}")
        for b in boxes
    ).replace(" ;", ";")


def run_validation(
    pipeline: Any, images: Path, labels: Path, out: Path, progress: bool = True
) -> Validation:
    """Run ``pipeline`` (a loaded CXR pipeline) on the labelled files; write the outputs."""
    from tqdm.auto import tqdm

    from dicomnode.imaging import Image8, ImageDecodeError, to_uint8
    from dicomnode.training import TrainingError
    from dicomnode.training.data import read_grey

    classes = list(pipeline.classes)
    result = Validation(classes, operating_points=dict(pipeline.operating_points))
    rows = read_labels(labels)
    usable: list[tuple[str, str]] = []
    for number, name, label in rows:
        where = name or f"line {number}"
        if not name:
            result.problems.append(Problem(where, f"line {number}: empty path"))
        elif label not in classes:
            result.problems.append(
                Problem(where, f"unknown label {label!r}; known: {', '.join(classes)}")
            )
        elif not (images / name).is_file():
            result.problems.append(Problem(where, "file not found"))
        else:
            usable.append((name, label))
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(usable), desc="validate", unit="image", disable=not progress)
    for start in range(0, len(usable), CHUNK):
        chunk = usable[start : start + CHUNK]
        decoded: list[tuple[str, Image8]] = []
        label_of = dict(chunk)
        for name, _ in chunk:
            try:
                if Path(name).suffix.lower() not in PICTURE_SUFFIXES:
                    # DICOM (any name): the node's own decoder, as a job decodes.
                    decoded.append((name, to_uint8(images / name)))
                    continue
                grey = read_grey(images / name)
            except (TrainingError, ImageDecodeError, OSError, ValueError) as exc:
                result.problems.append(Problem(name, f"unreadable image: {exc}"))
                continue
            decoded.append(
                (
                    name,
                    Image8(
                        pixels=grey,
                        Rows=grey.shape[0],
                        Columns=grey.shape[1],
                        PixelSpacing=None,
                        ImagerPixelSpacing=None,
                        PhotometricInterpretation="MONOCHROME2",
                        TransferSyntaxUID="",
                        NumberOfFrames=1,
                        voi="file",
                    ),
                )
            )
        for image in pipeline.analyse_images(decoded) if decoded else []:
            row: dict[str, Any] = {
                "path": image.sop_instance_uid,
                "label": label_of[image.sop_instance_uid],
            }
            row.update({f"p_{c}": round(image.probabilities[c], 6) for c in classes})
            row["outside_domain"] = image.outside_domain
            row["domain_score"] = "" if image.domain_score is None else round(image.domain_score, 4)
            for finding in result.operating_points:
                row[f"{finding}_present"] = image.findings.get(finding, "")
            row["boxes"] = _boxes(image.boxes)
            result.rows.append(row)
        bar.update(len(chunk))
    bar.close()
    _write_predictions(result, out / "predictions.csv")
    _write_report(result, out, images, labels)
    return result


def _write_predictions(result: Validation, path: Path) -> None:
    columns = ["path", "label", *(f"p_{c}" for c in result.classes), "outside_domain"]
    columns += ["domain_score", *(f"{f}_present" for f in result.operating_points), "boxes"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def _interval(k: int, n: int) -> str:
    from dicomnode.training.metrics import wilson

    if n == 0:
        return "n/a (no cases)"
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.3f} ({low:.3f}-{high:.3f})"


def _write_report(result: Validation, out: Path, images: Path, labels: Path) -> None:
    from dicomnode.training.card import plot_reliability, plot_roc
    from dicomnode.training.metrics import calibration, confusion_matrix, roc_auc, roc_curve

    classes = result.classes
    inside = [r for r in result.rows if not r["outside_domain"]]
    lines = [
        "# Site validation of the CXR pipeline",
        "",
        "**Research and demonstration only, not for diagnosis.**",
        "",
        f"- images: `{images}`; labels: `{labels}`",
        f"- analysed: {len(result.rows)}; outside the validated domain (no findings, left "
        f"out of the metrics below): {len(result.rows) - len(inside)}; not usable: "
        f"{len(result.problems)}",
        "",
    ]
    if inside:
        y = np.array([classes.index(r["label"]) for r in inside])
        p = np.array([[r[f"p_{c}"] for c in classes] for r in inside], dtype=np.float64)
        curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        auc_rows = []
        for k, c in enumerate(classes):
            truth = (y == k).astype(int)
            if 0 < truth.sum() < len(truth):
                fpr, tpr, _ = roc_curve(truth, p[:, k])
                auc = roc_auc(truth, p[:, k])
                curves[c] = (fpr, tpr, auc)
                auc_rows.append((c, f"{auc:.3f}", int(truth.sum()), len(truth)))
            else:
                auc_rows.append((c, "n/a (one class only)", int(truth.sum()), len(truth)))
        lines += ["## ROC AUC (one class against the rest)", ""]
        lines += _table(("class", "AUC", "positives", "n"), auc_rows)
        if curves:
            plot_roc(curves, out / "roc.png", title="ROC (site images)")
            lines += ["", "![ROC](roc.png)"]
        cal = {c: calibration(p[:, k], (y == k).astype(int)) for k, c in enumerate(classes)}
        plot_reliability(cal, out / "reliability.png", title="Reliability (site images)")
        lines += ["", "![Reliability](reliability.png)", ""]
        if result.operating_points:
            lines += ["## At the configured operating points (95 % Wilson intervals)", ""]
            op_rows = []
            for finding, point in sorted(result.operating_points.items()):
                k = classes.index(finding)
                present = p[:, k] >= point
                positive = y == k
                op_rows.append(
                    (
                        finding,
                        f"p >= {point:.4f}",
                        _interval(int((present & positive).sum()), int(positive.sum())),
                        _interval(int((~present & ~positive).sum()), int((~positive).sum())),
                    )
                )
            lines += _table(("finding", "operating point", "sensitivity", "specificity"), op_rows)
            lines += [""]
        matrix = confusion_matrix(y, p.argmax(axis=1), len(classes))
        lines += ["## Confusion table (true label against the most probable class)", ""]
        lines += _table(
            ("true \\ predicted", *classes),
            [(f"**{c}**", *map(int, matrix[k])) for k, c in enumerate(classes)],
        )
        lines += [""]
    else:
        lines += ["No analysed image inside the validated domain: nothing to measure.", ""]
    lines += ["## Files not used", ""]
    if result.problems:
        lines += _table(("path", "reason"), [(q.path, q.reason) for q in result.problems])
    else:
        lines += ["None."]
    lines += ["", f"Operating points: `{json.dumps(result.operating_points)}`", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def validate(
    settings: Any, images: Path, labels: Path, out: Path, progress: bool = True
) -> Validation:
    """Build and load the node's CXR pipeline from ``settings`` and run the validation."""
    from dicomnode.pipelines.cxr import CXRPipeline

    if not images.is_dir():
        raise ValidateError(f"images folder not found: {str(images)!r}")
    read_labels(labels)  # a bad labels file fails before the models load
    pipeline = CXRPipeline(settings.cxr, settings.routing)
    pipeline.load()
    return run_validation(pipeline, images, labels, out, progress)
