"""The training runner: seeded, with a progress bar, resumable, best-on-validation.

:func:`fit` trains a compiled Keras model epoch by epoch with ``train_on_batch``
(Keras 3 public API, any backend). After every epoch it measures the model with the
target's ``validate`` callback and writes, atomically, into the checkpoint folder:

* ``last.keras``: the model with its optimizer state (Keras saves both);
* ``best.keras``: the model of the best epoch so far on the monitored value;
* ``state.json``: the epochs completed, the history, the best epoch and score, and the
  run's *fingerprint* (target, builder arguments, seed, data, ...).

Running the same command again finds ``state.json``, checks the fingerprint (a
different one is an error, so a checkpoint is never silently mixed with another run),
reloads ``last.keras`` and continues with the next epoch. Randomness is fixed per
epoch: at the start of epoch ``e`` the runner calls ``keras.utils.set_random_seed``
with a value derived from (seed, e) and hands the target a numpy generator made from
(seed, e) for shuffling and augmentation, so a resumed run draws what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dicomnode.training import TrainingError, checkpoint_dir
from dicomnode.training.data import epoch_rng

log = logging.getLogger("dicomnode.training")

#: ``train_batches(epoch, rng)``: the (inputs, targets) batches of one epoch (1-based).
TrainBatches = Callable[[int, np.random.Generator], Iterable[tuple[Any, Any]]]
#: ``validate(model)``: validation metrics of the model, including the monitored key.
Validate = Callable[[Any], Mapping[str, float]]

STATE_FILE = "state.json"
LAST_FILE = "last.keras"
BEST_FILE = "best.keras"


@dataclass(frozen=True)
class FitSettings:
    """How to run :func:`fit`.

    ``monitor`` is a key of the ``validate`` result (or ``"loss"``, the mean training
    loss of the epoch); ``mode`` says whether higher (``"max"``) or lower is better.
    ``fingerprint`` must be JSON-serialisable and identifies the run for resuming.
    ``progress`` turns the per-batch bar on or off; one line per epoch is always printed.
    """

    epochs: int
    checkpoint_dir: Path
    seed: int
    steps_per_epoch: int
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    progress: bool = True
    fingerprint: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_command(
        cls,
        args: argparse.Namespace,
        *,
        epochs: int,
        steps_per_epoch: int,
        monitor: str,
        fingerprint: Mapping[str, Any],
        mode: Literal["min", "max"] = "max",
    ) -> FitSettings:
        """Settings for a ``dicomnode train`` run: its seed, checkpoint folder and progress
        bar come from the command line's common options."""
        return cls(
            epochs=epochs,
            checkpoint_dir=checkpoint_dir(args),
            seed=args.seed,
            steps_per_epoch=steps_per_epoch,
            monitor=monitor,
            mode=mode,
            progress=not args.no_progress,
            fingerprint=fingerprint,
        )


@dataclass
class FitResult:
    """What :func:`fit` returns: the best model and the record of the run."""

    model: Any
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    resumed_from: int
    """Epochs already completed when this call started (0 for a fresh run)."""
    seconds: float
    """Wall time of this call's epochs."""

    def record(self, target: str, seed: int, split_salt: str, metric: str) -> dict[str, Any]:
        """The part of a model card's training record every target shares: the target,
        seed and split salt, epochs run, the best epoch and its validation ``metric``
        (e.g. ``"auc"`` gives ``best_val_auc``), this call's training seconds and the
        Keras version and backend."""
        import keras

        return {
            "target": target,
            "seed": seed,
            "split_salt": split_salt,
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            f"best_val_{metric}": round(self.best_score, 6),
            "train_seconds": round(self.seconds, 1),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        }


def _atomic_save(model: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save(tmp)
    tmp.replace(path)


def _atomic_json(data: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_state(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json`` or ``None`` when there is no checkpoint yet."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{str(path)!r} is damaged ({exc}); delete the folder") from exc


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def _current_lr(model: Any) -> float:
    import keras

    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return float("nan")


def fit(
    build: Callable[[], Any],
    train_batches: TrainBatches,
    validate: Validate,
    settings: FitSettings,
    custom_objects: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train (or resume training) and return the best model on validation.

    ``build()`` returns a new *compiled* model (optimizer and loss chosen by the
    target); it is called only when there is no checkpoint. ``custom_objects`` are
    needed to reload a checkpoint whose loss or metrics are not Keras built-ins
    (or register them with ``keras.saving.register_keras_serializable``).
    """
    import keras
    from tqdm.auto import tqdm

    if settings.epochs <= 0:
        raise TrainingError(f"epochs must be positive, got {settings.epochs}")
    folder = Path(settings.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = _jsonable({**settings.fingerprint, "seed": settings.seed})
    state = read_state(folder)
    objects = dict(custom_objects or {})
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"checkpoint {str(folder)!r} belongs to another run "
                f"({state.get('fingerprint')!r}, this one is {fingerprint!r}); "
                "use another --checkpoint-dir or delete that folder"
            )
        if not (folder / LAST_FILE).is_file():
            raise TrainingError(f"checkpoint {str(folder)!r} has no {LAST_FILE}; delete it")
        model = keras.models.load_model(folder / LAST_FILE, custom_objects=objects, compile=True)
        done = int(state["epochs_completed"])
        history: list[dict[str, float]] = list(state["history"])
        best_epoch = int(state["best_epoch"])
        best_score: float | None = state["best_score"]
        log.info("resuming %s after epoch %d", folder, done)
        print(f"resuming from {folder} after epoch {done}", flush=True)
    else:
        keras.utils.set_random_seed(settings.seed)
        model = build()
        done, history, best_epoch, best_score = 0, [], 0, None
    resumed_from = done
    started = time.monotonic()
    for epoch in range(done + 1, settings.epochs + 1):
        keras.utils.set_random_seed(settings.seed * 10_007 + epoch)
        rng = epoch_rng(settings.seed, epoch)
        epoch_start = time.monotonic()
        losses: list[float] = []
        bar = tqdm(
            total=settings.steps_per_epoch,
            desc=f"epoch {epoch}/{settings.epochs}",
            unit="batch",
            disable=not settings.progress,
            leave=True,
        )
        for x, y in train_batches(epoch, rng):
            logs = model.train_on_batch(x, y, return_dict=True)
            losses.append(float(logs["loss"]))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        bar.close()
        if not losses:
            raise TrainingError("the training split produced no batches")
        record: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses))}
        record["lr"] = _current_lr(model)
        record.update({k: float(v) for k, v in validate(model).items()})
        record["seconds"] = round(time.monotonic() - epoch_start, 2)
        if settings.monitor not in record:
            raise TrainingError(
                f"validation gave no {settings.monitor!r}; it gave {sorted(record)}"
            )
        history.append(record)
        _atomic_save(model, folder / LAST_FILE)
        score = record[settings.monitor]
        if _better(score, best_score, settings.mode):
            best_epoch, best_score = epoch, score
            _atomic_save(model, folder / BEST_FILE)
        _atomic_json(
            {
                "epochs_completed": epoch,
                "history": history,
                "best_epoch": best_epoch,
                "best_score": best_score,
                "monitor": settings.monitor,
                "mode": settings.mode,
                "fingerprint": fingerprint,
            },
            folder / STATE_FILE,
        )
        summary = ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds")
        )
        message = f"epoch {epoch}/{settings.epochs}: {summary} ({record['seconds']:.0f} s)"
        log.info(message)
        print(message + (" *best*" if best_epoch == epoch else ""), flush=True)
    if not (folder / BEST_FILE).is_file():
        raise TrainingError(f"checkpoint {str(folder)!r} has no {BEST_FILE}; delete it")
    best = keras.models.load_model(folder / BEST_FILE, custom_objects=objects, compile=False)
    return FitResult(
        model=best,
        history=history,
        best_epoch=best_epoch,
        best_score=float(best_score) if best_score is not None else float("nan"),
        resumed_from=resumed_from,
        seconds=round(time.monotonic() - started, 2),
    )


def predict(model: Any, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """``model.predict`` in batches, quietly, as a float32 numpy array."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


__all__ = ["FitResult", "FitSettings", "TrainBatches", "Validate", "fit", "predict", "read_state"]
