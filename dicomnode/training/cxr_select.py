"""Validation-only choices for the multi-source MobileNetV2 classifier, and the site measures.

The measures (used on validation to choose, and on the held-out test split to report):

* within-source ROC AUCs: NIH normal vs pneumonia and Kermany normal vs pneumonia (score
  ``1 - p(normal)``), Kermany bacterial vs viral (the subtype head's ``p(viral)``);
* leave-one-source-out COVID-19: a head fitted without any image of one COVID-19 source
  (``hannover_covid19`` or ``ieee8023_covid_chestxray``), its COVID-19 recall (argmax) on
  that source's images of the evaluated split;
* normals called COVID-19 (argmax), per hospital.

:data:`SELECTION_RULE` is the criterion, fixed before any test image is read: the mean of
the two normal-vs-pneumonia AUCs, the mean leave-one-source-out COVID-19 recall, and one
minus the worst hospital's share of normals called COVID-19, all on validation. Ties go
to the earlier (simpler) configuration of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.training.cxr_heads import (
    LinearHead,
    balance_weights,
    fit_softmax,
    source_nuisance_projection,
)
from dicomnode.training.cxr_multisource import CLASSES
from dicomnode.training.metrics import roc_auc

SELECTION_RULE = (
    "maximise on validation: mean of [NIH normal-vs-pneumonia AUC, Kermany normal-vs-pneumonia "
    "AUC, mean leave-one-source-out COVID-19 recall (hannover, ieee8023 left out in turn), "
    "1 - worst hospital's share of normals called COVID-19]; ties to the earlier configuration"
)
COVID_SOURCES = ("hannover_covid19", "ieee8023_covid_chestxray")
NORMAL, PNEUMONIA, COVID = (CLASSES.index(c) for c in ("normal", "pneumonia", "covid19"))
#: Minimum normals of a hospital in a split before its normals-called-COVID share counts.
MIN_NORMALS = 5


@dataclass
class Table:
    """The assembled images' metadata as arrays (one row per image)."""

    y: np.ndarray
    sources: np.ndarray
    subtypes: np.ndarray
    splits: np.ndarray
    groups: np.ndarray

    def mask(self, split: str, source: str | None = None, labels: Sequence[int] = ()) -> np.ndarray:
        m = self.splits == split
        if source is not None:
            m &= self.sources == source
        if labels:
            m &= np.isin(self.y, list(labels))
        return m


@dataclass(frozen=True)
class Config:
    """One point of the validation grid."""

    view: str
    balancing: str
    nuisance: int
    l2: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "balancing": self.balancing,
            "nuisance": self.nuisance,
            "l2": self.l2,
        }


def fit_head(features: np.ndarray, table: Table, train: np.ndarray, config: Config) -> LinearHead:
    """The 3-class head of ``config`` on the ``train`` rows."""
    x, y, s = features[train], table.y[train], table.sources[train]
    projection = (
        source_nuisance_projection(x, y, list(s), config.nuisance) if config.nuisance else None
    )
    return fit_softmax(
        x,
        y,
        len(CLASSES),
        weights=balance_weights(y, list(s), config.balancing),
        l2=config.l2,
        projection=projection,
    )


def fit_subtype_head(
    features: np.ndarray, table: Table, train: np.ndarray, l2: float
) -> LinearHead:
    """Bacterial (0) vs viral (1) on the typed pneumonias of ``train``, class-balanced."""
    typed = train & np.isin(table.subtypes, ["bacterial", "viral"])
    y = (table.subtypes[typed] == "viral").astype(np.int64)
    return fit_softmax(features[typed], y, 2, weights=balance_weights(y, [], "class"), l2=l2)


def within_source_aucs(
    p: np.ndarray, viral: np.ndarray, table: Table, split: str
) -> dict[str, float]:
    """The three within-source AUCs on ``split`` (see the module)."""
    out = {}
    for name, source in (
        ("nih_normal_vs_pneumonia", "nih_cxr14"),
        ("kermany_normal_vs_pneumonia", "kermany_pediatric"),
    ):
        m = table.mask(split, source, (NORMAL, PNEUMONIA))
        out[name] = roc_auc((table.y[m] == PNEUMONIA).astype(int), 1 - p[m, NORMAL])
    m = table.mask(split, "kermany_pediatric") & np.isin(table.subtypes, ["bacterial", "viral"])
    out["kermany_bacterial_vs_viral"] = roc_auc(
        (table.subtypes[m] == "viral").astype(int), viral[m]
    )
    return out


def normals_called_covid(p: np.ndarray, table: Table, split: str) -> dict[str, tuple[int, int]]:
    """Per hospital with normals in ``split``: (normals called COVID-19, normals)."""
    out = {}
    for source in sorted(set(table.sources)):
        m = table.mask(split, source, (NORMAL,))
        if m.sum():
            out[source] = (int((p[m].argmax(axis=1) == COVID).sum()), int(m.sum()))
    return out


Member = tuple[np.ndarray, Config]


def _mean_probabilities(
    members: Sequence[Member], table: Table, train: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Mean of the ``members``' head probabilities on ``rows`` (heads fitted on ``train``)."""
    return np.mean(
        [fit_head(x, table, train, c).probabilities(x[rows]) for x, c in members], axis=0
    )


def loso_covid(
    members: Sequence[Member] | np.ndarray,
    table: Table,
    config: Config | None = None,
    split: str = "val",
) -> dict[str, dict[str, Any]]:
    """Per left-out COVID-19 source: recall on its ``split`` images, and the normals of the
    other hospitals called COVID-19 by that head (from its ``split``), with the per-image
    outcomes for intervals. ``members`` is one feature matrix with ``config``, or a list of
    (features, config) whose probabilities are averaged."""
    if isinstance(members, np.ndarray):
        assert config is not None
        members = [(members, config)]
    out: dict[str, dict[str, Any]] = {}
    for left_out in COVID_SOURCES:
        train = table.mask("train") & (table.sources != left_out)
        covid = table.mask(split, left_out, (COVID,))
        normals = table.mask(split, labels=(NORMAL,)) & (table.sources != left_out)
        p_covid = _mean_probabilities(members, table, train, covid)
        p_norm = _mean_probabilities(members, table, train, normals)
        out[left_out] = {
            "recall": float((p_covid.argmax(axis=1) == COVID).mean()),
            "n_covid": int(covid.sum()),
            "called": (p_covid.argmax(axis=1) == COVID).astype(int),
            "normals_called_covid": int((p_norm.argmax(axis=1) == COVID).sum()),
            "n_normals": int(normals.sum()),
            "normal_called": (p_norm.argmax(axis=1) == COVID).astype(int),
            "normal_sources": table.sources[normals],
        }
    return out


def criterion(
    members: Sequence[Member] | np.ndarray,
    table: Table,
    config: Config | None = None,
    split: str = "val",
) -> tuple[float, dict[str, Any]]:
    """:data:`SELECTION_RULE` on ``split`` (heads fitted on train) for one feature matrix
    with ``config`` or the probability mean of several (features, config) members."""
    if isinstance(members, np.ndarray):
        assert config is not None
        members = [(members, config)]
    train = table.mask("train")
    everything = np.ones(len(table.y), dtype=bool)
    p = _mean_probabilities(members, table, train, everything)
    viral = np.mean(
        [fit_subtype_head(x, table, train, c.l2).probabilities(x)[:, 1] for x, c in members],
        axis=0,
    )
    aucs = within_source_aucs(p, viral, table, split)
    loso = loso_covid(members, table, split=split)
    called = normals_called_covid(p, table, split)
    worst = max(n / d for n, d in called.values() if d >= MIN_NORMALS)
    recall = float(np.mean([v["recall"] for v in loso.values()]))
    parts = [
        aucs["nih_normal_vs_pneumonia"],
        aucs["kermany_normal_vs_pneumonia"],
        recall,
        1 - worst,
    ]
    detail = {
        **aucs,
        "loso_recall": {k: v["recall"] for k, v in loso.items()},
        "worst_normals_called_covid": worst,
        "criterion": float(np.mean(parts)),
    }
    return float(np.mean(parts)), detail
