"""Export a trained model into ``models/<name>/``: ``model.keras`` plus ``manifest.toml``.

The manifest is what :func:`dicomnode.inference.registry.read_manifest` reads; after
writing, :func:`export_model` reads it back (and :func:`verify_export` loads the model)
so an export that the node could not use fails here, not at the node's start-up.

The Device UID of a model is derived from its name and version
(:func:`dicomnode.results.uids.uuid_uid`, the project's ``2.25`` UUID form): the same
model version always has the same Device UID, a new version a new one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.inference.registry import ModelSpec, load_model, read_manifest, sha256_of
from dicomnode.results.uids import uuid_uid
from dicomnode.training import TrainingError

WEIGHTS_FILE = "model.keras"
MANIFEST_FILE = "manifest.toml"


@dataclass(frozen=True)
class ClassCode:
    """One output class and its coded concept, as written in ``[[classes]]``."""

    name: str
    code_value: str
    coding_scheme: str
    code_meaning: str


def device_uid(name: str, version: str) -> str:
    """The model's Device UID: a ``2.25`` UID derived from its name and version."""
    return uuid_uid("dicomnode-model-device", name, version)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TrainingError(f"cannot write a non-finite number to a manifest: {value!r}")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TrainingError(f"cannot write {type(value).__name__} {value!r} to a manifest")


def _table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def inference_copy(model: Any) -> Any:
    """An uncompiled copy of a functional ``model`` with its weights: no optimizer state,
    no loss, so the shipped file holds only what inference needs."""
    import keras

    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    return clean


def export_model(
    model: Any,
    out_dir: Path,
    *,
    name: str,
    version: str,
    task: str,
    architecture: str,
    input_size: tuple[int, int],
    channels: int,
    scale: float = 1 / 255,
    builder: Mapping[str, Any] | None = None,
    classes: Sequence[ClassCode] = (),
    gradcam_layer: str | None = None,
    threshold: float | None = None,
    ensemble_weight: float | None = None,
    input_extra: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra_tables: Mapping[str, Mapping[str, Any]] | None = None,
    description: str = "",
) -> ModelSpec:
    """Save ``model`` as ``out_dir/model.keras``, write the manifest, return it parsed.

    The weights file holds an :func:`inference_copy` (no optimizer state).

    ``input_extra`` adds keys to ``[input]`` (e.g. CT ``window_center``/``window_width``);
    ``training`` becomes the ``[training]`` table and must name the ``target`` that
    ``dicomnode evaluate`` uses to re-measure the model; ``extra_tables`` are written as
    they are (a detector's ``[postprocess]``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp.keras"
    inference_copy(model).save(tmp)
    tmp.replace(weights)
    header: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": task,
        "architecture": architecture,
        "device_uid": device_uid(name, version),
    }
    if threshold is not None:
        header["threshold"] = float(threshold)
    parts = []
    if description:
        parts.append("".join(f"# {line}\n" for line in description.splitlines()))
    parts.append("".join(f"{k} = {_toml_value(v)}\n" for k, v in header.items()))
    parts.append(
        _table("weights", {"file": WEIGHTS_FILE, "format": "keras", "sha256": sha256_of(weights)})
    )
    parts.append(
        _table(
            "input",
            {
                "size": [int(input_size[0]), int(input_size[1])],
                "channels": int(channels),
                "scale": float(scale),
                **dict(input_extra or {}),
            },
        )
    )
    if ensemble_weight is not None:
        parts.append(_table("ensemble", {"weight": float(ensemble_weight)}))
    if gradcam_layer:
        parts.append(_table("gradcam", {"layer": gradcam_layer}))
    if builder:
        parts.append(_table("builder", dict(builder)))
    if training:
        parts.append(_table("training", dict(training)))
    for table_name, values in (extra_tables or {}).items():
        parts.append(_table(table_name, dict(values)))
    for c in classes:
        parts.append(
            "[[classes]]\n"
            + "".join(
                f"{k} = {_toml_value(getattr(c, k))}\n"
                for k in ("name", "code_value", "coding_scheme", "code_meaning")
            )
        )
    manifest = out_dir / MANIFEST_FILE
    tmp_manifest = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp_manifest.write_text("\n".join(parts), encoding="utf-8")
    tmp_manifest.replace(manifest)
    return read_manifest(manifest)


def verify_export(out_dir: Path) -> tuple[ModelSpec, Any]:
    """Read ``out_dir/manifest.toml`` and load the model as the node would."""
    spec = read_manifest(Path(out_dir) / MANIFEST_FILE)
    return spec, load_model(spec)


def training_table(manifest: Path) -> dict[str, Any]:
    """The ``[training]`` table of a manifest (empty when it has none)."""
    import tomllib

    try:
        data = tomllib.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TrainingError(f"{str(manifest)!r}: cannot read the manifest: {exc}") from exc
    table = data.get("training", {})
    return dict(table) if isinstance(table, dict) else {}


def training_record(model_dir: Path, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a card states about how ``model_dir`` was trained.

    The manifest's ``[training]`` table, overlaid with ``training`` when given (a fresh
    training run), else with the ``training`` record of the existing ``metrics.json`` (a
    re-evaluation keeps what the training run recorded).
    """
    from dicomnode.training.card import read_metrics

    model_dir = Path(model_dir)
    if training is None:
        try:
            training = dict(read_metrics(model_dir).get("training", {}))
        except (OSError, ValueError):
            training = {}
    return {**training_table(model_dir / MANIFEST_FILE), **training}


__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ClassCode",
    "device_uid",
    "export_model",
    "inference_copy",
    "training_record",
    "training_table",
    "verify_export",
]
