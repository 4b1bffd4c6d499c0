"""The model registry: one ``manifest.toml`` per model, checked and loaded once.

A manifest says what a model is (architecture, input, preprocessing, classes with
codes, ensemble role and weight, Grad-CAM layer, version, Device UID) and where its
weights are (file, format, sha256). Supported weight formats:

* ``keras``: a Keras 3 ``.keras`` file;
* ``h5-model``: a full-model HDF5 file as Keras 2 wrote it (the seed authors'
  published ``vgg16_pruning_20percent.h5`` etc.), loaded by Keras 3's legacy reader;
* ``h5-weights``: weights only, loaded into the manifest's ``architecture`` builder
  (``dicomnode.nets``) with ``builder`` arguments.

A checksum mismatch or a missing file is a clear error at start-up, naming the
manifest, the key and the bad value.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomNodeError

log = logging.getLogger("dicomnode.models")

TASKS = ("lung-mask", "classifier", "stacking", "detector", "ct-classifier")
FORMATS = ("keras", "h5-model", "h5-weights")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ModelError(DicomNodeError):
    """A model's manifest or weights are unusable."""


@dataclass(frozen=True)
class CodedClass:
    """One output class: its name and a coded concept (SNOMED CT or DCM)."""

    name: str
    code_value: str
    coding_scheme: str
    code_meaning: str


@dataclass(frozen=True)
class ModelSpec:
    """A validated manifest."""

    name: str
    version: str
    task: str
    architecture: str
    weights: Path
    weights_format: str
    sha256: str
    device_uid: str
    input_size: tuple[int, int]
    channels: int
    scale: float
    classes: tuple[CodedClass, ...] = ()
    crop: str = "lung"
    """What a radiograph classifier sees: ``[input] crop``, ``lung`` (the node's lung
    crop, the default) or ``whole`` (the whole image)."""
    normalisation: str = "none"
    """``[input] normalisation`` of the grey image before resizing (see
    :data:`NORMALISATIONS`)."""
    ensemble_weight: float | None = None
    gradcam_layer: str | None = None
    threshold: float | None = None
    window: tuple[float, float] | None = None
    """CT classifier input window (center, width) in HU: ``[input] window_center`` and
    ``window_width`` (the lung window -600 / 1500 when a ct-classifier gives none)."""
    builder: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    """A detector's ``[postprocess]`` table (see ``inference.detector.BoxSettings``)."""
    manifest: Path | None = None

    @property
    def class_names(self) -> list[str]:
        """Class names in output order."""
        return [c.name for c in self.classes]


#: ``[input] crop`` values: the lung crop or the whole image.
INPUT_CROPS = ("lung", "whole")
#: ``[input] normalisation`` values: none, or histogram equalisation of the grey image.
NORMALISATIONS = ("none", "equalise")


def _need(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ModelError(f"{where}: '{key}' is required")
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ModelError(f"{where}: '{key}' has the wrong type: {value!r}")
    return value


def read_manifest(path: Path) -> ModelSpec:
    """Parse and validate ``path``; errors name the manifest, the key and the value."""
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{where}: no such manifest") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{where}: not valid TOML: {exc}") from None
    task = _need(data, "task", str, where)
    if task not in TASKS:
        raise ModelError(f"{where}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    weights_table = _need(data, "weights", dict, where)
    fmt = _need(weights_table, "format", str, f"{where} [weights]")
    if fmt not in FORMATS:
        raise ModelError(f"{where}: [weights] 'format' must be one of {FORMATS}, got {fmt!r}")
    sha256 = _need(weights_table, "sha256", str, f"{where} [weights]").lower()
    if not _SHA256_RE.match(sha256):
        raise ModelError(f"{where}: [weights] 'sha256' is not a SHA-256 hex digest: {sha256!r}")
    device_uid = _need(data, "device_uid", str, where)
    if not _UID_RE.match(device_uid) or len(device_uid) > 64:
        raise ModelError(f"{where}: 'device_uid' is not a valid DICOM UID: {device_uid!r}")
    inputs = _need(data, "input", dict, where)
    size = _need(inputs, "size", list, f"{where} [input]")
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ModelError(f"{where}: [input] 'size' must be [height, width], got {size!r}")
    channels = _need(inputs, "channels", int, f"{where} [input]")
    if channels not in (1, 3):
        raise ModelError(f"{where}: [input] 'channels' must be 1 or 3, got {channels!r}")
    classes = tuple(
        CodedClass(
            name=_need(c, "name", str, f"{where} [[classes]]"),
            code_value=_need(c, "code_value", str, f"{where} [[classes]]"),
            coding_scheme=_need(c, "coding_scheme", str, f"{where} [[classes]]"),
            code_meaning=_need(c, "code_meaning", str, f"{where} [[classes]]"),
        )
        for c in data.get("classes", [])
    )
    for c in classes:
        if len(c.code_meaning) > 64:
            raise ModelError(
                f"{where}: [[classes]] 'code_meaning' is longer than DICOM's 64 characters: "
                f"{c.code_meaning!r}"
            )
    if task in ("classifier", "stacking") and len(classes) < 2:
        raise ModelError(f"{where}: a {task} needs its [[classes]] in output order")
    window = _window(inputs, task, where)
    crop_kind = inputs.get("crop", "lung")
    if crop_kind not in INPUT_CROPS:
        raise ModelError(
            f"{where}: [input] 'crop' must be one of {', '.join(INPUT_CROPS)}, got {crop_kind!r}"
        )
    normalisation = inputs.get("normalisation", "none")
    if normalisation not in NORMALISATIONS:
        raise ModelError(
            f"{where}: [input] 'normalisation' must be one of {', '.join(NORMALISATIONS)}, "
            f"got {normalisation!r}"
        )
    threshold = data.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 <= threshold <= 1
    ):
        raise ModelError(f"{where}: 'threshold' must be a number in [0, 1], got {threshold!r}")
    if task == "ct-classifier" and len(classes) > 1:
        raise ModelError(
            f"{where}: a ct-classifier has one sigmoid output: at most one [[classes]] "
            f"entry (the positive finding), got {len(classes)}"
        )
    ensemble = data.get("ensemble", {})
    weight = ensemble.get("weight")
    if weight is not None and (not isinstance(weight, int | float) or weight < 0):
        raise ModelError(f"{where}: [ensemble] 'weight' must be a number >= 0, got {weight!r}")
    return ModelSpec(
        name=_need(data, "name", str, where),
        version=_need(data, "version", str, where),
        task=task,
        architecture=_need(data, "architecture", str, where),
        weights=(path.parent / _need(weights_table, "file", str, f"{where} [weights]")),
        weights_format=fmt,
        sha256=sha256,
        device_uid=device_uid,
        input_size=(size[0], size[1]),
        channels=channels,
        scale=float(inputs.get("scale", 1 / 255)),
        classes=classes,
        crop=crop_kind,
        normalisation=normalisation,
        ensemble_weight=float(weight) if weight is not None else None,
        gradcam_layer=data.get("gradcam", {}).get("layer"),
        threshold=float(threshold) if threshold is not None else None,
        window=window,
        builder=dict(data.get("builder", {})),
        postprocess=dict(data.get("postprocess", {})),
        manifest=path,
    )


#: Window (center, width) in HU of a ct-classifier whose manifest names none: the lung window.
DEFAULT_CT_WINDOW = (-600.0, 1500.0)


def _window(inputs: dict[str, Any], task: str, where: str) -> tuple[float, float] | None:
    """``[input] window_center`` / ``window_width`` (HU), both or neither; default for CT."""
    center, width = inputs.get("window_center"), inputs.get("window_width")
    if center is None and width is None:
        return DEFAULT_CT_WINDOW if task == "ct-classifier" else None
    if center is None or width is None:
        raise ModelError(
            f"{where}: [input] needs both 'window_center' and 'window_width', got "
            f"window_center = {center!r}, window_width = {width!r}"
        )
    for key, value in (("window_center", center), ("window_width", width)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelError(f"{where}: [input] '{key}' must be a number (HU), got {value!r}")
    if width <= 0:
        raise ModelError(f"{where}: [input] 'window_width' must be > 0 HU, got {width!r}")
    return float(center), float(width)


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(spec: ModelSpec) -> None:
    """Raise :class:`ModelError` unless the weights file exists and matches its sha256."""
    if not spec.weights.is_file():
        raise ModelError(f"{spec.manifest}: [weights] 'file' not found: {str(spec.weights)!r}")
    actual = sha256_of(spec.weights)
    if actual != spec.sha256:
        raise ModelError(
            f"{spec.manifest}: [weights] 'sha256' is {spec.sha256!r} but "
            f"{spec.weights.name} has {actual!r}: wrong or damaged weights file"
        )


def load_model(spec: ModelSpec, mixed_precision: bool = False) -> Any:
    """Verify and load the Keras model a manifest describes.

    With ``mixed_precision`` the model computes in float16 (variables stay float32, the
    output layers too, for stable probabilities): :func:`to_mixed_precision`. A saved
    model keeps the dtype policy it was saved with, so setting Keras' global policy
    alone would change nothing for it.
    """
    import keras

    verify_weights(spec)
    if spec.weights_format in ("keras", "h5-model"):
        model = keras.models.load_model(spec.weights, compile=False)
    else:
        from dicomnode.nets import ARCHITECTURES

        try:
            builder = ARCHITECTURES[spec.architecture]
        except KeyError:
            raise ModelError(
                f"{spec.manifest}: 'architecture' {spec.architecture!r} is not one of "
                f"{', '.join(sorted(ARCHITECTURES))}"
            ) from None
        model = builder(**spec.builder)
        model.load_weights(spec.weights)
    expected = (*spec.input_size, spec.channels)
    actual = tuple(model.input_shape[1:])
    # A stacking meta-model takes the members' concatenated outputs, not an image.
    if spec.task != "stacking" and actual != expected:
        raise ModelError(f"{spec.manifest}: [input] says {expected} but the model takes {actual}")
    if mixed_precision:
        model = to_mixed_precision(model)
    log.info(
        "loaded model %s %s (%s%s)",
        spec.name,
        spec.version,
        spec.weights.name,
        ", mixed float16" if mixed_precision else "",
    )
    return model


def to_mixed_precision(model: Any) -> Any:
    """A copy of a functional ``model`` whose layers compute in float16 with float32
    variables (Keras' ``mixed_float16`` policy), its output layers in float32; same weights."""
    import keras

    outputs = {id(t._keras_history[0]) for t in model.outputs}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32" if id(layer) in outputs else "mixed_float16"
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone)
    mixed.set_weights(model.get_weights())
    return mixed


def configure_devices() -> str:
    """Use the GPU when the backend sees one (memory growth on); return a description."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):  # already initialised
                tf.config.experimental.set_memory_growth(gpu, True)
        device = f"{len(gpus)} GPU(s)" if gpus else "CPU"
    elif backend == "jax":
        import jax

        device = ", ".join(sorted({d.platform for d in jax.devices()}))
    else:
        device = backend
    return f"{backend} on {device}"


def use_mixed_precision(requested: bool, device: str) -> bool:
    """Whether to compute in float16: when ``requested`` and ``device`` (from
    :func:`configure_devices`) is an accelerator; a CPU has no fast float16, so there
    the models stay float32 (logged)."""
    on_cpu = device.endswith((" on CPU", " on cpu"))
    if requested and on_cpu:
        log.info("mixed_precision is on but the models run on %s: computing in float32", device)
    return requested and not on_cpu
