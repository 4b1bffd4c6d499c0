"""Training, evaluation and (later) pruning of the node's models: ``dicomnode train|evaluate``.

The framework (shared by every target):

* :mod:`dicomnode.training.data`: image reading, deterministic group splits, augmentation;
* :mod:`dicomnode.training.loop`: the resumable, seeded training runner;
* :mod:`dicomnode.training.metrics`: Dice, IoU, ROC/AUC, accuracy, confusion, calibration;
* :mod:`dicomnode.training.card`: ``MODEL_CARD.md``, ``metrics.json`` and the plots;
* :mod:`dicomnode.training.export`: ``.keras`` weights plus a registry ``manifest.toml``.

A *target* is one kind of model the node can train (``lung-unet``, ``ct-classifier``,
``detector``, ``member``, ``stacking``). Each lives in a module of the
:mod:`dicomnode.training.recipes` package and registers a :class:`Target` with
:func:`register` when imported; :func:`targets` imports every module of that package
and returns the registry (adding a target is adding a module: no list to edit).
Target modules must not import Keras at module level, so that building the command
line stays fast.

``dicomnode evaluate MODEL_DIR`` finds the target that made a model in the manifest's
``[training]`` table (``target = "lung-unet"``) and calls its ``evaluate``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomNodeError

#: The repository root (the folder holding ``pyproject.toml`` and ``models/``).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where the training data lives unless ``--data`` says otherwise: ``../shared/data``.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
#: Seed used when ``--seed`` is not given.
DEFAULT_SEED = 42

#: The package whose modules register targets when imported.
TARGETS_PACKAGE = "dicomnode.training.recipes"


class TrainingError(DicomNodeError):
    """Training, evaluation or export cannot go on (missing data, bad arguments, ...)."""


@dataclass(frozen=True)
class Target:
    """One trainable kind of model.

    ``add_arguments(parser)`` adds the target's own options to its ``train`` sub-parser
    (the common ones, see :func:`add_common_arguments`, are already there).
    ``train(args)`` trains, exports, evaluates and returns the model folder.
    ``evaluate(model_dir, data_dir)`` re-measures a trained model on its held-out split,
    rewrites ``MODEL_CARD.md``, ``metrics.json`` and the plots, and returns the metrics.
    """

    name: str
    summary: str
    train: Callable[[argparse.Namespace], Path]
    evaluate: Callable[[Path, Path], dict[str, Any]] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    default_out: str | None = None
    """Default ``--out``, relative to the repository root (``models/<name>`` if ``None``)."""


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add ``target`` to the registry (a second registration of a name replaces the first)."""
    _REGISTRY[target.name] = target
    return target


def targets() -> dict[str, Target]:
    """Every registered target, by name, after importing the modules of :data:`TARGETS_PACKAGE`."""
    package = importlib.import_module(TARGETS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{TARGETS_PACKAGE}.{info.name}")
    return dict(_REGISTRY)


def get_target(name: str) -> Target:
    """The target called ``name``; a clear :class:`TrainingError` when there is none."""
    known = targets()
    if name not in known:
        raise TrainingError(
            f"unknown training target {name!r}; known: {', '.join(sorted(known)) or 'none'}"
        )
    return known[name]


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The options every ``dicomnode train TARGET`` accepts."""
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"training data root (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / default_out,
        metavar="DIR",
        help=f"model folder to write (default: {default_out})",
    )
    parser.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs to train")
    parser.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="images per batch"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="checkpoints; running the same command again resumes there "
        "(default: .checkpoints/NAME in the repository)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """``--checkpoint-dir`` or the default ``<repository>/.checkpoints/<out folder name>``."""
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir)
    return REPO_ROOT / ".checkpoints" / Path(args.out).name


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a :class:`TrainingError` naming it and ``what``."""
    if not Path(path).is_dir():
        raise TrainingError(f"{what} not found: {str(path)!r} (give it with --data DIR)")
    return Path(path)


__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_SEED",
    "REPO_ROOT",
    "TARGETS_PACKAGE",
    "Target",
    "TrainingError",
    "add_common_arguments",
    "checkpoint_dir",
    "get_target",
    "register",
    "require_dir",
    "targets",
]
