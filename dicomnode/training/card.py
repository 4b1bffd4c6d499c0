"""Model cards: ``MODEL_CARD.md`` for people, ``metrics.json`` for tests, PNG plots.

A :class:`ModelCard` holds what a reader needs to judge a model: the data and their
licences, how the split was made and its counts, the training settings, the measured
metrics (tables rendered by the target) and the plots. :func:`write_card` writes the
card and ``metrics.json`` (``{"name", "version", "split", "metrics", "splits",
"training"}``) next to the model; the tests re-measure the shipped models and compare
with ``metrics.json``, so the card's numbers are the ones the tests measure.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.training.metrics import Calibration

CARD_FILE = "MODEL_CARD.md"
METRICS_FILE = "metrics.json"
#: Every card says this, verbatim.
NOT_FOR_DIAGNOSIS = "Research and demonstration only, not for diagnosis."


@dataclass(frozen=True)
class DataSource:
    """One data set used for training or evaluation."""

    name: str
    description: str
    licence: str
    citation: str = ""


@dataclass
class ModelCard:
    """The content of a ``MODEL_CARD.md``.

    ``tables`` are (heading, markdown) pairs in order; ``plots`` (caption, file name)
    pairs of PNGs in the model folder; ``metrics`` the measured numbers (JSON-able).
    """

    name: str
    version: str
    title: str
    summary: str
    architecture: str
    input: str
    data: Sequence[DataSource]
    split_method: str
    split_counts: Mapping[str, Mapping[str, int]]
    training: Mapping[str, Any]
    metrics: Mapping[str, Any]
    evaluated_split: str = "test"
    tables: Sequence[tuple[str, str]] = ()
    plots: Sequence[tuple[str, str]] = ()
    limitations: Sequence[str] = ()
    commands: Sequence[str] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]] | Sequence[Any]) -> str:
    """A GitHub markdown table; floats with 4 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def confusion_table(matrix: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A confusion matrix as a markdown table (rows true, columns predicted)."""
    m = np.asarray(matrix)
    rows = [[f"**{labels[i]}**", *(int(v) for v in m[i])] for i in range(len(labels))]
    return markdown_table(["true \\ predicted", *labels], rows)


def _jsonable(value: Any) -> Any:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, Calibration):
            return obj.as_json()
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def render(card: ModelCard) -> str:
    """The markdown text of ``card``."""
    out = [f"# {card.title}", "", f"**{NOT_FOR_DIAGNOSIS}**", "", card.summary, ""]
    out += [
        "## Model",
        "",
        f"- Name: `{card.name}`, version {card.version}",
        f"- Architecture: {card.architecture}",
        f"- Input: {card.input}",
        "",
        "## Data",
        "",
    ]
    for source in card.data:
        out.append(f"- **{source.name}**: {source.description} Licence: {source.licence}.")
        if source.citation:
            out.append(f"  Cite: {source.citation}.")
    out += ["", "## Splits", "", card.split_method, ""]
    rows = [
        [split, counts.get("images", 0), counts.get("groups", 0)]
        for split, counts in card.split_counts.items()
    ]
    out += [markdown_table(["split", "images", "groups"], rows), ""]
    out += ["## Training", ""]
    out += [f"- {key}: {value}" for key, value in card.training.items()]
    out += ["", f"## Metrics on the held-out {card.evaluated_split} split", ""]
    for heading, table in card.tables:
        out += [f"### {heading}", "", table, ""]
    for caption, filename in card.plots:
        out += [f"![{caption}]({filename})", ""]
    out += [f"The numbers are also in `{METRICS_FILE}`; the tests re-measure them.", ""]
    if card.commands:
        out += ["## Reproduce", "", "```sh", *card.commands, "```", ""]
    out += ["## Limitations", ""]
    out += [f"- {item}" for item in card.limitations]
    out += [f"- {NOT_FOR_DIAGNOSIS}", ""]
    return "\n".join(out)


def write_card(folder: Path, card: ModelCard) -> tuple[Path, Path]:
    """Write ``MODEL_CARD.md`` and ``metrics.json`` into ``folder``; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card_path = folder / CARD_FILE
    metrics_path = folder / METRICS_FILE
    payload = _jsonable(
        {
            "name": card.name,
            "version": card.version,
            "split": card.evaluated_split,
            "metrics": card.metrics,
            "splits": card.split_counts,
            "training": card.training,
            **({"extra": card.extra} if card.extra else {}),
        }
    )
    for path, text in (
        (card_path, render(card)),
        (metrics_path, json.dumps(payload, indent=2, sort_keys=True) + "\n"),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return card_path, metrics_path


def read_metrics(folder: Path) -> dict[str, Any]:
    """The ``metrics.json`` of a model folder."""
    return json.loads((Path(folder) / METRICS_FILE).read_text(encoding="utf-8"))


# --- plots --------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str = "ROC"
) -> Path:
    """ROC curves ``{label: (fpr, tpr, auc)}`` in one PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path)


def plot_confusion(
    matrix: np.ndarray | Sequence[Sequence[int]],
    labels: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    """A confusion matrix (rows true, columns predicted) with counts in the cells."""
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2), dpi=100)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=labels)
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    limit = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            colour = "white" if m[i, j] > limit else "black"
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", color=colour)
    return _save(plt, fig, path)


def plot_reliability(
    calibrations: Mapping[str, Calibration], path: Path, title: str = "Reliability"
) -> Path:
    """Reliability diagram(s): observed frequency against mean confidence per bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for label, cal in calibrations.items():
        keep = cal.count > 0
        ax.plot(
            cal.confidence[keep],
            cal.frequency[keep],
            marker="o",
            label=f"{label} (ECE {cal.ece:.3f})",
        )
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize="small")
    return _save(plt, fig, path)


def plot_histogram(
    values: Sequence[float], path: Path, title: str, xlabel: str, bins: int = 20
) -> Path:
    """A histogram (e.g. per-image Dice)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.hist(np.asarray(values, dtype=np.float64), bins=bins, color="tab:blue")
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    return _save(plt, fig, path)


# --- report sections: metrics + tables + plots in one call -----------------------------


@dataclass
class Report:
    """Metrics (for ``metrics.json``), markdown tables and plots of one evaluation."""

    metrics: dict[str, Any]
    tables: list[tuple[str, str]]
    plots: list[tuple[str, str]]


def classifier_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    folder: Path,
    label: str,
    file_prefix: str = "",
) -> Report:
    """Multi-class classifier metrics: per-class one-vs-rest ROC AUC, macro AUC,
    accuracy, confusion matrix, top-label calibration (ECE), with ROC, confusion and
    reliability PNGs written to ``folder`` as ``<prefix>roc.png``,
    ``<prefix>confusion.png`` and ``<prefix>reliability.png``.
    """
    from dicomnode.training import metrics as m

    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    pred = p.argmax(axis=1)
    aucs = m.one_vs_rest_auc(y, p)
    matrix = m.confusion_matrix(y, pred, len(class_names))
    cal = m.top_label_calibration(y, p)
    folder = Path(folder)
    curves = {}
    for k, name in enumerate(class_names):
        fpr, tpr, _ = m.roc_curve((y == k).astype(np.int64), p[:, k])
        curves[name] = (fpr, tpr, aucs[k])
    roc_png = plot_roc(curves, folder / f"{file_prefix}roc.png", title=f"{label}: ROC")
    cm_png = plot_confusion(
        matrix, class_names, folder / f"{file_prefix}confusion.png", title=f"{label}: confusion"
    )
    rel_png = plot_reliability(
        {label: cal}, folder / f"{file_prefix}reliability.png", title=f"{label}: reliability"
    )
    metrics = {
        "n": int(y.size),
        "accuracy": m.accuracy(y, pred),
        "auc": dict(zip(class_names, aucs, strict=True)),
        "macro_auc": float(np.mean(aucs)),
        "confusion_matrix": matrix.tolist(),
        "ece": cal.ece,
        "calibration": cal.as_json(),
    }
    rows = [[name, aucs[k]] for k, name in enumerate(class_names)]
    rows.append(["macro", metrics["macro_auc"]])
    tables = [
        (
            f"{label}: accuracy {metrics['accuracy']:.4f}, ECE {cal.ece:.4f} (n = {y.size})",
            markdown_table(["class", "ROC AUC (one vs rest)"], rows),
        ),
        (f"{label}: confusion matrix", confusion_table(matrix, class_names)),
    ]
    plots = [
        (f"{label} ROC curves", roc_png.name),
        (f"{label} confusion matrix", cm_png.name),
        (f"{label} reliability diagram", rel_png.name),
    ]
    return Report(metrics, tables, plots)


def binary_report(
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    class_names: tuple[str, str],
    folder: Path,
    label: str,
    file_prefix: str = "",
) -> Report:
    """Binary classifier metrics at ``threshold``: ROC AUC, accuracy, sensitivity,
    specificity, confusion matrix, calibration (ECE), with ROC, confusion and
    reliability PNGs. ``class_names`` are (negative, positive).
    """
    from dicomnode.training import metrics as m

    y = np.asarray(y_true).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    summary = m.binary_summary(y, s, threshold)
    cal = m.calibration(s, y)
    fpr, tpr, _ = m.roc_curve(y, s)
    folder = Path(folder)
    roc_png = plot_roc(
        {label: (fpr, tpr, float(summary["auc"]))},  # type: ignore[arg-type]
        folder / f"{file_prefix}roc.png",
        title=f"{label}: ROC",
    )
    cm_png = plot_confusion(
        summary["confusion_matrix"],  # type: ignore[arg-type]
        list(class_names),
        folder / f"{file_prefix}confusion.png",
        title=f"{label}: confusion at {threshold:.3f}",
    )
    rel_png = plot_reliability(
        {label: cal}, folder / f"{file_prefix}reliability.png", title=f"{label}: reliability"
    )
    metrics: dict[str, Any] = {**summary, "ece": cal.ece, "calibration": cal.as_json()}
    rows = [
        ["ROC AUC", summary["auc"]],
        [f"accuracy at threshold {threshold:.4f}", summary["accuracy"]],
        ["sensitivity", summary["sensitivity"]],
        ["specificity", summary["specificity"]],
        ["expected calibration error (10 bins)", cal.ece],
        ["images", summary["n"]],
    ]
    tables = [
        (label, markdown_table(["metric", "value"], rows)),
        (
            f"{label}: confusion matrix",
            confusion_table(summary["confusion_matrix"], list(class_names)),  # type: ignore[arg-type]
        ),
    ]
    plots = [
        (f"{label} ROC curve", roc_png.name),
        (f"{label} confusion matrix", cm_png.name),
        (f"{label} reliability diagram", rel_png.name),
    ]
    return Report(metrics, tables, plots)


__all__ = [
    "CARD_FILE",
    "METRICS_FILE",
    "NOT_FOR_DIAGNOSIS",
    "DataSource",
    "ModelCard",
    "Report",
    "binary_report",
    "classifier_report",
    "confusion_table",
    "markdown_table",
    "plot_confusion",
    "plot_histogram",
    "plot_reliability",
    "plot_roc",
    "read_metrics",
    "render",
    "write_card",
]
