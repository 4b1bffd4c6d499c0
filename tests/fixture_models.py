"""Tiny Keras models with manifests, for tests only: the CXR pipeline's plumbing, not accuracy.

``write_cxr_models(root)`` writes a lung "U-Net" (dark pixels are lung), three random
classifier members with the seed's ensemble weights, a stacking meta-model and a
detector (bright pixels are opacity), each in ``root/<name>/`` with a manifest.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import keras
import numpy as np

from dicomnode.inference.registry import sha256_of

SIZE = 64
CLASSES = [
    ("bacterial", "53084003", "Bacterial pneumonia"),
    ("covid19", "840539006", "COVID-19"),
    ("normal", "17621005", "Normal"),
]


def _write(folder: Path, model: keras.Model, task: str, channels: int, **extra: object) -> None:
    folder.mkdir(parents=True)
    weights = folder / "model.keras"
    model.save(weights)
    classes = (
        "".join(
            f'\n[[classes]]\nname = "{n}"\ncode_value = "{c}"\ncoding_scheme = "SCT"\n'
            f'code_meaning = "{m}"\n'
            for n, c, m in CLASSES
        )
        if task in ("classifier", "stacking")
        else ""
    )
    ensemble = f"\n[ensemble]\nweight = {extra['weight']}\n" if "weight" in extra else ""
    gradcam = f'\n[gradcam]\nlayer = "{extra["layer"]}"\n' if "layer" in extra else ""
    size = extra.get("size", [SIZE, SIZE])
    (folder / "manifest.toml").write_text(
        textwrap.dedent(
            f"""
            name = "{folder.name}"
            version = "0.1"
            task = "{task}"
            architecture = "test"
            device_uid = "1.2.826.0.1.3680043.10.999.{abs(hash(folder.name)) % 1000}"

            [weights]
            file = "model.keras"
            format = "keras"
            sha256 = "{sha256_of(weights)}"

            [input]
            size = {list(size)}
            channels = {channels}
            """
        )
        + ensemble
        + gradcam
        + classes
    )


def _pixel_model(weight: float, bias: float) -> keras.Model:
    """sigmoid(weight * x + bias) per pixel: dark (w < 0) or bright (w > 0) regions."""
    inputs = keras.Input((SIZE, SIZE, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    layer.set_weights([np.full((1, 1, 1, 1), weight, "float32"), np.full((1,), bias, "float32")])
    return model


def _member(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _meta() -> keras.Model:
    keras.utils.set_random_seed(11)
    inputs = keras.Input((9,))
    x = keras.layers.Dense(9, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def write_cxr_models(root: Path) -> Path:
    """Write the fixture models under ``root``; return it."""
    _write(root / "lung", _pixel_model(-20.0, 10.0), "lung-mask", 1)
    for name, seed, weight in (("m1", 1, 0.1), ("m2", 2, 0.4), ("m3", 3, 0.5)):
        _write(root / name, _member(seed), "classifier", 3, weight=weight, layer="last_conv")
    _write(root / "meta", _meta(), "stacking", 3, size=[9, 1])
    _write(root / "detector", _pixel_model(20.0, -12.0), "detector", 1)
    return root


def cxr_node_sections(
    models: Path, orthanc_port: int | None = None, **cxr: object
) -> dict[str, object]:
    """``running_node`` sections: the CXR pipeline on these fixture models in one worker
    process, and (with ``orthanc_port``) Orthanc as the destination ``pacs``."""
    sections: dict[str, object] = {
        "worker": {"pipeline": "cxr", "processes": 1},
        "cxr": {
            "models_dir": str(models),
            "lung_mask": "lung",
            "members": ["m1", "m2", "m3"],
            "explain_member": "m1",
            "detector": "detector",
            **cxr,
        },
    }
    if orthanc_port is not None:
        sections["destinations"] = [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
        ]
    return sections


#: The CT classifier's one class (SNOMED CT 840539006 "COVID-19").
CT_CLASS = ("covid19", "840539006", "COVID-19")


def write_ct_model(
    root: Path,
    name: str = "ct-tiny",
    size: int = 64,
    channels: int = 1,
    threshold: float = 0.5,
    window: tuple[float, float] | None = None,
) -> Path:
    """A tiny random-weight DenseNet with the seed 001 head (growth rate 4, four one-layer
    blocks) and its ct-classifier manifest under ``root/name``; returns ``root``."""
    from dicomnode.nets.ct import densenet121_sigmoid

    keras.utils.set_random_seed(7)
    model = densenet121_sigmoid(
        input_size=size, channels=channels, growth_rate=4, blocks=(1, 1, 1, 1)
    )
    folder = root / name
    folder.mkdir(parents=True)
    weights = folder / "model.keras"
    model.save(weights)
    window_lines = f"window_center = {window[0]}\nwindow_width = {window[1]}\n" if window else ""
    cls, code, meaning = CT_CLASS
    (folder / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "0.1"\ntask = "ct-classifier"\n'
        f'architecture = "densenet121_sigmoid"\n'
        f'device_uid = "1.2.826.0.1.3680043.10.999.801"\nthreshold = {threshold}\n\n'
        f'[weights]\nfile = "model.keras"\nformat = "keras"\nsha256 = "{sha256_of(weights)}"\n\n'
        f"[input]\nsize = [{size}, {size}]\nchannels = {channels}\nscale = {1 / 255}\n"
        f"{window_lines}\n"
        f'[gradcam]\nlayer = "relu"\n\n'
        f'[[classes]]\nname = "{cls}"\ncode_value = "{code}"\ncoding_scheme = "SCT"\n'
        f'code_meaning = "{meaning}"\n'
    )
    return root


def ct_node_sections(
    models: Path, orthanc_port: int | None = None, pipeline: str = "ct", **ct: object
) -> dict[str, object]:
    """``running_node`` sections: the CT pipeline on the fixture model in one worker process
    (and with ``orthanc_port``, Orthanc as the destination ``pacs``)."""
    selection = ct.pop("selection", {})
    sections: dict[str, object] = {
        "worker": {"pipeline": pipeline, "processes": 1},
        "ct": {"models_dir": str(models), "classifier": "ct-tiny", **ct},
    }
    if selection:
        sections["ct"]["selection"] = selection  # type: ignore[index]
    if orthanc_port is not None:
        sections["destinations"] = [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
        ]
    return sections
