"""APoZ iterative channel pruning of the seed 000 classifiers (Hu et al. 2016, as the seed).

APoZ, the Average Percentage of Zeros of a channel, is the share of its post-ReLU
activations that are zero, measured on validation images. A channel that is almost always
zero contributes little, so the seed removes, per step, the 2 % of convolution channels
with the highest APoZ, fine-tunes, and repeats up to 50 %, keeping the best step by the
validation metric.

What this module prunes
-----------------------
*Prunable* convolutions are ``Conv2D`` layers whose output is rectified, either by their own
``activation="relu"`` (the VGG blocks and the seed head ``extra_conv1_*``) or by a
``BatchNormalization -> ReLU`` pair right after them (the Inception-style units
``*_conv -> *_bn -> relu``), and whose channels reach only layers whose channel handling is
known here: per-channel layers (BatchNormalization, ReLU/Activation, pooling, zero padding,
dropout, global pooling, and a ``DepthwiseConv2D`` of depth multiplier 1, whose kernel is
sliced on its channel axis: so the MobileNetV2 expansion convolutions ``block_*_expand``
are prunable), ``Concatenate`` along channels (the Inception blocks: the pruned branch's
slice of the concatenation shrinks), and the consumers ``Conv2D`` (input channels
sliced) and ``Dense`` (input rows sliced). A convolution that feeds anything else (an
``Add``, a ``SeparableConv2D``, ...) is left whole. For the builders in
:mod:`dicomnode.nets.classifiers` with the ``conv`` head that means every convolution of
VGG-16/19 and of the Inception-style stand-in, including the branch convolutions inside
each mixed block; the full-width Keras Inception-V3 is handled the same way.

The ranking is **global**: APoZ values of all prunable channels are compared with one
another and the highest ``step`` share of the *original* prunable channel count is removed
per step, so late, sparse layers lose more than early ones. Every layer keeps at least
``min_keep`` of its original channels (and at least one).

The pruned model is a new functional model with the same layer names, inputs and outputs,
built by :func:`keras.models.clone_model` with smaller ``filters``; every surviving weight is
copied exactly (a convolution's kernel is sliced on its output axis by its own kept
channels and on its input axis by the kept channels that reach it; BatchNorm vectors and
``Dense`` rows likewise), so removing a channel that is always zero leaves the outputs
unchanged. Keras 3 public APIs only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from dicomnode.errors import DicomNodeError

log = logging.getLogger("dicomnode.training.prune")

#: Layers that act on each channel separately: a channel subset passes through them.
_PER_CHANNEL = (
    keras.layers.BatchNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
)

#: A map from each tensor to the original channel indices it still carries (None: all).
ChannelMap = dict[int, "np.ndarray | None"]


class PruneError(DicomNodeError):
    """The model cannot be pruned as asked."""


@dataclass(frozen=True)
class PrunableConv:
    """One prunable convolution and the layer whose output is its rectified activation."""

    conv: str
    activation: str
    channels: int


@dataclass
class PruneStep:
    """One row of the pruning table (step 0 is the unpruned model)."""

    step: int
    channels_removed_fraction: float
    channels: int
    parameters: int
    parameter_reduction: float
    metric: float
    channels_per_layer: dict[str, int] = field(default_factory=dict)


@dataclass
class PruneResult:
    """The pruning table, the chosen step and its model."""

    steps: list[PruneStep]
    best_step: int
    model: keras.Model
    metric_name: str
    global_ranking: bool = True

    @property
    def best(self) -> PruneStep:
        """The chosen step's row."""
        return self.steps[self.best_step]

    def table(self) -> str:
        """The per-step table as Markdown (the chosen step marked)."""
        lines = [
            f"| step | channels removed | channels | parameters | parameter reduction "
            f"| validation {self.metric_name} | |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in self.steps:
            mark = "**kept**" if row.step == self.best_step else ""
            lines.append(
                f"| {row.step} | {row.channels_removed_fraction:.1%} | {row.channels} "
                f"| {row.parameters:,} | {row.parameter_reduction:.2%} | {row.metric:.4f} "
                f"| {mark} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- graph


def _inputs_of(layer: keras.layers.Layer) -> list[keras.KerasTensor]:
    value = layer.input
    return list(value) if isinstance(value, list | tuple) else [value]


def _consumers(model: keras.Model) -> dict[int, list[keras.layers.Layer]]:
    """Tensor id -> the layers of ``model`` that take it as input."""
    consumers: dict[int, list[keras.layers.Layer]] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for tensor in _inputs_of(layer):
            consumers.setdefault(id(tensor), []).append(layer)
    return consumers


def _is_relu(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        return not config.get("negative_slope") and config.get("threshold", 0.0) == 0.0
    if isinstance(layer, keras.layers.Activation | keras.layers.Conv2D):
        return layer.get_config().get("activation") == "relu"
    return False


def _is_depthwise(layer: keras.layers.Layer) -> bool:
    """A depthwise convolution with one output channel per input channel."""
    return (
        isinstance(layer, keras.layers.DepthwiseConv2D)
        and layer.get_config().get("depth_multiplier", 1) == 1
    )


def _propagate(model: keras.Model, keep: dict[str, np.ndarray]) -> tuple[ChannelMap, dict]:
    """Channel maps of every tensor when convolution ``name`` keeps ``keep[name]``.

    Returns the tensor maps and, per layer name, the map of its (first) input, and raises
    :class:`PruneError` naming the layer when a pruned map reaches a layer not handled here.
    """
    maps: ChannelMap = {}
    input_maps: dict[str, np.ndarray | None] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            maps[id(layer.output)] = None
            continue
        tensors = _inputs_of(layer)
        in_maps = [maps[id(t)] for t in tensors]
        input_maps[layer.name] = in_maps[0]
        if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
            out = keep.get(layer.name)
        elif isinstance(layer, keras.layers.Concatenate):
            if layer.get_config().get("axis", -1) not in (-1, len(tensors[0].shape) - 1):
                out = None
                if any(m is not None for m in in_maps):
                    raise PruneError(f"cannot prune through {layer.name}: not a channel concat")
            elif all(m is None for m in in_maps):
                out = None
            else:
                parts, offset = [], 0
                for tensor, m in zip(tensors, in_maps, strict=True):
                    width = int(tensor.shape[-1])
                    parts.append((np.arange(width) if m is None else m) + offset)
                    offset += width
                out = np.concatenate(parts)
        elif isinstance(layer, _PER_CHANNEL) or _is_depthwise(layer):
            out = in_maps[0]
        elif isinstance(layer, keras.layers.Dense):
            out = None
        else:
            if any(m is not None for m in in_maps):
                raise PruneError(
                    f"cannot prune channels that reach layer {layer.name!r} "
                    f"({type(layer).__name__})"
                )
            out = None
        outputs = layer.output if isinstance(layer.output, list | tuple) else [layer.output]
        for tensor in outputs:
            maps[id(tensor)] = out
    return maps, input_maps


def prunable_convolutions(model: keras.Model) -> list[PrunableConv]:
    """The convolutions of ``model`` this module can prune, in layer order (see the module)."""
    consumers = _consumers(model)
    found = []
    for layer in model.layers:
        if type(layer) is not keras.layers.Conv2D or layer.get_config().get("groups", 1) != 1:
            continue
        activation = None
        if _is_relu(layer):
            activation = layer.name
        else:
            after = consumers.get(id(layer.output), [])
            if len(after) == 1 and isinstance(after[0], keras.layers.BatchNormalization):
                relu = consumers.get(id(after[0].output), [])
                if len(relu) == 1 and _is_relu(relu[0]):
                    activation = relu[0].name
        if activation is None:
            continue
        channels = int(layer.output.shape[-1])
        if channels < 2:
            continue
        try:
            _propagate(model, {layer.name: np.arange(channels - 1)})
        except PruneError as exc:
            log.debug("not pruning %s: %s", layer.name, exc)
            continue
        found.append(PrunableConv(layer.name, activation, channels))
    return found


# --------------------------------------------------------------------------- APoZ


def apoz(
    model: keras.Model,
    images: np.ndarray,
    convolutions: Sequence[PrunableConv] | None = None,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """APoZ per output channel of each prunable convolution, measured on ``images``.

    The share of post-ReLU activations equal to zero over images and positions, in [0, 1].
    """
    convs = list(convolutions) if convolutions is not None else prunable_convolutions(model)
    if not convs:
        raise PruneError(f"model {model.name!r} has no prunable convolution")
    if len(images) == 0:
        raise PruneError("APoZ needs at least one validation image")
    probe = keras.Model(
        model.inputs, [model.get_layer(c.activation).output for c in convs], name="apoz_probe"
    )
    zeros = [np.zeros(c.channels, np.float64) for c in convs]
    counts = [0] * len(convs)
    for start in range(0, len(images), batch_size):
        outputs = probe([images[start : start + batch_size]], training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for index, value in enumerate(outputs):
            value = keras.ops.convert_to_numpy(value)
            flat = value.reshape(-1, value.shape[-1])
            zeros[index] += (flat <= 0).sum(axis=0)
            counts[index] += flat.shape[0]
    return {c.conv: zeros[i] / counts[i] for i, c in enumerate(convs)}


def choose_channels(
    scores: dict[str, np.ndarray],
    n_remove: int,
    original: dict[str, int],
    min_keep: float = 0.1,
) -> dict[str, np.ndarray]:
    """Global ranking: drop the ``n_remove`` channels with the highest APoZ over all layers.

    ``scores[name]`` holds the APoZ of the channels a layer has now; the result maps each
    layer to the positions (into its current channels) it keeps, in order. Each layer keeps
    at least ``max(1, ceil(min_keep * original[name]))`` channels. Ties go to the earlier
    layer and channel (a stable order), so the choice is deterministic.
    """
    floor = {name: max(1, math.ceil(min_keep * original[name])) for name in scores}
    candidates = [
        (-float(value), order, name, channel)
        for order, (name, values) in enumerate(scores.items())
        for channel, value in enumerate(values)
    ]
    candidates.sort()
    remaining = {name: len(values) for name, values in scores.items()}
    removed: dict[str, set[int]] = {name: set() for name in scores}
    for _, _, name, channel in candidates:
        if n_remove <= 0:
            break
        if remaining[name] <= floor[name]:
            continue
        removed[name].add(channel)
        remaining[name] -= 1
        n_remove -= 1
    return {
        name: np.array([c for c in range(len(values)) if c not in removed[name]], dtype=np.int64)
        for name, values in scores.items()
    }


# --------------------------------------------------------------------------- surgery


def prune_channels(
    model: keras.Model, keep: Mapping[str, Sequence[int] | np.ndarray]
) -> keras.Model:
    """A new model where convolution ``name`` keeps only channels ``keep[name]``.

    Layer names, inputs and outputs stay; surviving weights are copied exactly.
    """
    prunable = {c.conv for c in prunable_convolutions(model)}
    keep_arrays: dict[str, np.ndarray] = {}
    for name, channels in keep.items():
        if name not in prunable:
            raise PruneError(f"layer {name!r} is not a prunable convolution of {model.name!r}")
        array = np.asarray(sorted(set(int(c) for c in channels)), dtype=np.int64)
        width = int(model.get_layer(name).output.shape[-1])
        if array.size == 0 or array[0] < 0 or array[-1] >= width:
            raise PruneError(
                f"layer {name!r}: channels to keep {list(channels)!r} not in 0..{width - 1}"
            )
        keep_arrays[name] = array
    _, input_maps = _propagate(model, keep_arrays)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in keep_arrays:
            config["filters"] = len(keep_arrays[layer.name])
        return layer.__class__.from_config(config)

    pruned = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        in_map = input_maps.get(layer.name)
        out = keep_arrays.get(layer.name)
        if isinstance(layer, keras.layers.Conv2D):
            kernel = weights[0]
            if in_map is not None:
                kernel = kernel[:, :, in_map, :]
            if out is not None:
                kernel = kernel[..., out]
            rest = [w if out is None else w[out] for w in weights[1:]]
            new = [kernel, *rest]
        elif _is_depthwise(layer):
            kernel = weights[0] if in_map is None else weights[0][:, :, in_map, :]
            new = [kernel, *(w if in_map is None else w[in_map] for w in weights[1:])]
        elif isinstance(layer, keras.layers.BatchNormalization):
            new = [w if in_map is None else w[in_map] for w in weights]
        elif isinstance(layer, keras.layers.Dense):
            new = [weights[0] if in_map is None else weights[0][in_map], *weights[1:]]
        else:
            new = weights
        pruned.get_layer(layer.name).set_weights(new)
    return pruned


# --------------------------------------------------------------------------- iterations


def iterative_prune(
    model: keras.Model,
    validation_images: np.ndarray,
    fine_tune: Callable[[keras.Model, int], keras.Model],
    evaluate: Callable[[keras.Model], float],
    step: float = 0.02,
    max_fraction: float = 0.5,
    tolerance: float = 0.0,
    min_keep: float = 0.1,
    metric_name: str = "macro ROC AUC",
    work_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """The seed's loop: measure APoZ, drop ``step`` of the channels, fine-tune, repeat.

    ``fine_tune(model, step)`` trains the (uncompiled) pruned model of ``step`` and
    returns the model to keep (e.g. its best epoch on validation); ``evaluate(model)``
    returns the validation metric (higher is better). Steps continue until
    ``max_fraction`` of the original prunable channels are gone. The kept step is the
    best by the metric; with ``tolerance > 0`` it is the most pruned step whose metric is
    within ``tolerance`` of the best (smaller at no real cost).
    With ``work_dir``, each step's model and the table are saved there and a rerun resumes
    from the last saved step.
    """
    if not 0 < step < 1 or not 0 < max_fraction < 1 or step > max_fraction:
        raise PruneError(f"need 0 < step <= max < 1, got step={step!r} max={max_fraction!r}")
    say = progress or (lambda line: log.info("%s", line))
    convs = prunable_convolutions(model)
    if not convs:
        raise PruneError(f"model {model.name!r} has no prunable convolution")
    original = {c.conv: c.channels for c in convs}
    total = sum(original.values())
    base_params = model.count_params()
    per_step = max(1, round(step * total))
    n_steps = math.floor(max_fraction / step + 1e-9)
    table_path = work_dir / "prune_steps.json" if work_dir else None
    if work_dir:
        work_dir.mkdir(parents=True, exist_ok=True)

    def row(index: int, current: keras.Model, metric: float) -> PruneStep:
        widths = {c: int(current.get_layer(c).output.shape[-1]) for c in original}
        channels = sum(widths.values())
        params = current.count_params()
        return PruneStep(
            step=index,
            channels_removed_fraction=1 - channels / total,
            channels=channels,
            parameters=params,
            parameter_reduction=1 - params / base_params,
            metric=float(metric),
            channels_per_layer=widths,
        )

    steps: list[PruneStep] = []
    models: list[keras.Model] = []
    saved: list[dict] = []
    if table_path and table_path.is_file():
        saved = json.loads(table_path.read_text(encoding="utf-8"))
    current = model
    for index in range(n_steps + 1):
        checkpoint = work_dir / f"step_{index:02d}.keras" if work_dir else None
        if index < len(saved) and checkpoint and checkpoint.is_file():
            current = keras.models.load_model(checkpoint, compile=False)
            steps.append(PruneStep(**saved[index]))
            models.append(current)
            say(f"step {index}: resumed from {checkpoint.name}")
            continue
        if index > 0:
            scores = apoz(current, validation_images, prunable_convolutions(current))
            keep = choose_channels(scores, per_step, original, min_keep)
            if all(len(keep[n]) == len(scores[n]) for n in scores):
                say(f"step {index}: nothing left to prune above the per-layer floor")
                break
            current = prune_channels(current, keep)
            current = fine_tune(current, index)
        steps.append(row(index, current, evaluate(current)))
        models.append(current)
        if checkpoint:
            current.save(checkpoint)
            table_path.write_text(  # type: ignore[union-attr]
                json.dumps([asdict(s) for s in steps], indent=1), encoding="utf-8"
            )
        last = steps[-1]
        say(
            f"step {index}: {last.channels_removed_fraction:.1%} channels removed, "
            f"{last.parameters:,} parameters ({last.parameter_reduction:.1%} fewer), "
            f"validation {metric_name} {last.metric:.4f}"
        )
    best_metric = max(s.metric for s in steps)
    eligible = [s.step for s in steps if s.metric >= best_metric - tolerance]
    best = max(eligible) if tolerance > 0 else min(s.step for s in steps if s.metric == best_metric)
    return PruneResult(steps, best, models[best], metric_name)


__all__ = [
    "PrunableConv",
    "PruneError",
    "PruneResult",
    "PruneStep",
    "apoz",
    "choose_channels",
    "iterative_prune",
    "prunable_convolutions",
    "prune_channels",
]
