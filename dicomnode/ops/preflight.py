"""What ``serve`` checks before it accepts an association, and ``config check`` reports.

:func:`load_settings` checks the file itself (types, ranges, key names). This module
checks what the file points at: the model folders the configured pipeline loads
(manifests, tasks, classes, the weights' SHA-256), the TLS certificates and keys (that
they load, not only that they exist) and whether the data directory can be written.
Every problem is reported with the configuration key that leads to it, in one
:class:`~dicomnode.errors.ConfigError`, so that ``config check`` and ``serve`` fail the
same way (exit code 2) on the same mistakes.

It reads manifests and hashes weights files; it does not load Keras models (the
workers do that, and a model whose manifest and checksum are right but whose layers
do not match still fails there).
"""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import CTSettings, CXRSettings, Settings
from dicomnode.errors import ConfigError
from dicomnode.inference.registry import ModelError, ModelSpec, read_manifest, verify_weights

Problem = tuple[str, str]


@dataclass(frozen=True)
class ModelRef:
    """A model the configuration names: the key naming it and its manifest, once read."""

    key: str
    name: str
    spec: ModelSpec | None


def _read(models_dir: Path, key: str, name: str, problems: list[Problem]) -> ModelSpec | None:
    """The verified manifest of model ``name`` under ``models_dir``, or None (problem noted)."""
    folder = models_dir / name
    if not folder.is_dir():
        known = sorted(p.name for p in models_dir.iterdir() if (p / "manifest.toml").is_file())
        problems.append(
            (key, f"no model named {name!r} in {str(models_dir)!r} (models there: "
                  f"{', '.join(known) or 'none'})")
        )  # fmt: skip
        return None
    try:
        spec = read_manifest(folder / "manifest.toml")
        verify_weights(spec)
    except ModelError as exc:
        problems.append((key, f"model {name!r}: {exc}"))
        return None
    return spec


def _models_dir_ok(key: str, models_dir: Path, problems: list[Problem]) -> bool:
    if not models_dir.is_dir():
        problems.append((key, f"no such folder: {str(models_dir)!r}"))
        return False
    return True


def _task(ref: ModelRef, wanted: tuple[str, ...], problems: list[Problem]) -> None:
    if ref.spec is not None and ref.spec.task not in wanted:
        problems.append(
            (ref.key, f"model {ref.name!r} has task {ref.spec.task!r}, expected "
                      f"{' or '.join(repr(w) for w in wanted)}")
        )  # fmt: skip


def check_cxr(s: CXRSettings) -> list[Problem]:
    """Problems with the ``[cxr]`` models (what :class:`CXRPipeline.load` would raise on)."""
    problems: list[Problem] = []
    if not _models_dir_ok("cxr.models_dir", s.models_dir, problems):
        return problems
    lung = ModelRef("cxr.lung_mask", s.lung_mask, None)
    if not s.lung_mask:
        problems.append(("cxr.lung_mask", "is required (the lung-mask model's name)"))
    else:
        lung = ModelRef(lung.key, lung.name, _read(s.models_dir, lung.key, lung.name, problems))
        _task(lung, ("lung-mask",), problems)
    members = [
        ModelRef(
            f"cxr.members[{i}]", name, _read(s.models_dir, f"cxr.members[{i}]", name, problems)
        )
        for i, name in enumerate(s.members)
    ]
    for ref in members:
        _task(ref, ("classifier",), problems)
    specs = [m.spec for m in members if m.spec is not None and m.spec.task == "classifier"]
    classes = [spec.class_names for spec in specs]
    if classes and any(c != classes[0] for c in classes):
        problems.append(("cxr.members", f"members disagree on their classes and order: {classes}"))
    if classes:
        for key in ("explain_class", "normal_class"):
            value = getattr(s, key)
            if value not in classes[0]:
                problems.append((f"cxr.{key}", f"{value!r} is not one of {classes[0]}"))
    if s.strategy == "weighted" and any(spec.ensemble_weight is None for spec in specs):
        problems.append(
            ("cxr.strategy", "weighted ensemble: every member manifest needs [ensemble] weight")
        )
    if s.strategy == "stacking" and not s.stacking:
        problems.append(("cxr.stacking", "is required when cxr.strategy = stacking"))
    if s.stacking:
        ref = ModelRef(
            "cxr.stacking", s.stacking, _read(s.models_dir, "cxr.stacking", s.stacking, problems)
        )
        _task(ref, ("stacking",), problems)
    if s.detector:
        ref = ModelRef(
            "cxr.detector", s.detector, _read(s.models_dir, "cxr.detector", s.detector, problems)
        )
        _task(ref, ("detector",), problems)
    explainer = s.explain_member or s.members[0]
    by_name = {m.name: m for m in members}
    if explainer not in by_name:
        problems.append(
            ("cxr.explain_member", f"{explainer!r} is not one of cxr.members {list(s.members)}")
        )
    else:
        spec = by_name[explainer].spec
        if spec is not None and not spec.gradcam_layer:
            problems.append(
                (
                    "cxr.explain_member",
                    f"model {explainer!r} has no [gradcam] layer to explain with",
                )
            )
    return problems


def check_ct(s: CTSettings) -> list[Problem]:
    """Problems with the ``[ct]`` models (what :class:`CTPipeline.load` would raise on)."""
    problems: list[Problem] = []
    if not _models_dir_ok("ct.models_dir", s.models_dir, problems):
        return problems
    ref = ModelRef(
        "ct.classifier", s.classifier, _read(s.models_dir, "ct.classifier", s.classifier, problems)
    )
    _task(ref, ("ct-classifier",), problems)
    spec = ref.spec
    if spec is not None and spec.task == "ct-classifier":
        if not spec.gradcam_layer:
            problems.append(("ct.classifier", f"model {s.classifier!r} has no [gradcam] layer"))
        if len(spec.classes) != 1:
            problems.append(
                ("ct.classifier", f"model {s.classifier!r} needs one [[classes]] entry, got "
                                  f"{len(spec.classes)}")
            )  # fmt: skip
    if s.lung_mask:
        mask = ModelRef(
            "ct.lung_mask", s.lung_mask, _read(s.models_dir, "ct.lung_mask", s.lung_mask, problems)
        )
        _task(mask, ("lung-mask",), problems)
    return problems


def check_pipeline(settings: Settings) -> list[Problem]:
    """Problems with ``[worker] pipeline`` and the models it loads (none without workers)."""
    spec = settings.worker.pipeline
    if spec in ("placeholder",):
        return []
    if spec == "cxr":
        return check_cxr(settings.cxr)
    if spec == "ct":
        return check_ct(settings.ct)
    if spec == "chest":
        return check_cxr(settings.cxr) + check_ct(settings.ct)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            return [("worker.pipeline", f"cannot load {spec!r}: {exc}")]
        return []
    return [
        (
            "worker.pipeline",
            f"unknown pipeline {spec!r} (cxr, ct, chest, placeholder or module:callable)",
        )
    ]


def _tls_files(settings: Settings) -> Iterator[tuple[str, Path, Path | None, Path | None]]:
    """(key, certificate, private key, CA file) of every TLS table in the settings."""
    tls = settings.receive.tls
    if tls is not None:
        yield "receive.tls", tls.certificate, tls.private_key, tls.ca_certificates
    for i, d in enumerate(settings.destinations):
        if d.tls is not None:
            yield (
                f"destinations[{i}].tls",
                d.tls.certificate,
                d.tls.private_key,
                d.tls.ca_certificates,
            )  # type: ignore[misc]


def check_tls(settings: Settings) -> list[Problem]:
    """Certificates, keys and CA files that exist but do not load (wrong format, mismatch)."""
    problems: list[Problem] = []
    for key, certificate, private_key, ca in _tls_files(settings):
        if certificate is not None and private_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(certfile=certificate, keyfile=private_key)
            except (ssl.SSLError, OSError) as exc:
                problems.append(
                    (f"{key}.certificate", f"{str(certificate)!r} with {str(private_key)!r} "
                                            f"does not load: {exc}")
                )  # fmt: skip
        if ca is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                context.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as exc:
                problems.append((f"{key}.ca_certificates", f"{str(ca)!r} does not load: {exc}"))
    return problems


def check_data_dir(settings: Settings) -> list[Problem]:
    """Whether ``node.data_dir`` exists and is writable, or can be created."""
    folder = settings.node.data_dir
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [("node.data_dir", f"{str(existing)!r} is not a folder")]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "is not writable" if existing == folder else f"cannot be created in {str(existing)!r}"
        )
        return [("node.data_dir", f"{str(folder)!r} {what} by this user")]
    return []


def problems(settings: Settings) -> list[Problem]:
    """Everything ``serve`` would fail on at start besides the file's own mistakes."""
    found = check_data_dir(settings) + check_tls(settings)
    if settings.worker.processes > 0:
        found += check_pipeline(settings)
    return found


def check(settings: Settings, *, workers: bool | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`problems` finds.

    ``workers``: check the pipeline's models even when ``worker.processes`` is 0
    (``dicomnode worker`` runs them); default: as ``serve`` would.
    """
    found = problems(settings)
    if workers and settings.worker.processes == 0:
        found += check_pipeline(settings)
    if found:
        raise ConfigError(found)
