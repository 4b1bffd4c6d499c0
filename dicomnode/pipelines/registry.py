"""The registry of pipelines by name: what ``worker.pipeline`` may name.

Apart from the pipeline interface (:mod:`dicomnode.pipelines.types`), so that no
pipeline imports the registry that imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicomnode.errors import ConfigError
from dicomnode.pipelines.types import Pipeline

if TYPE_CHECKING:
    from dicomnode.config import Settings


def _needs(settings: Settings | None, name: str) -> Settings:
    if settings is None:
        raise ConfigError([("worker.pipeline", f"the {name} pipeline needs the settings")])
    return settings


def _placeholder(_settings: Settings | None) -> Pipeline:
    from dicomnode.pipelines.placeholder import PlaceholderPipeline

    return PlaceholderPipeline()


def _cxr(settings: Settings | None) -> Pipeline:
    from dicomnode.pipelines.cxr import CXRPipeline

    s = _needs(settings, "cxr")
    return CXRPipeline(s.cxr, s.routing)


def _ct(settings: Settings | None) -> Pipeline:
    from dicomnode.pipelines.ct import CTPipeline

    return CTPipeline(_needs(settings, "ct").ct)


def _chest(settings: Settings | None) -> Pipeline:
    from dicomnode.pipelines.chest import ChestPipeline
    from dicomnode.pipelines.ct import CTPipeline
    from dicomnode.pipelines.cxr import CXRPipeline

    s = _needs(settings, "chest")
    return ChestPipeline(CXRPipeline(s.cxr, s.routing), CTPipeline(s.ct))


#: The built-in pipelines: name -> factory (imported on use: models load in workers only).
PIPELINES: dict[str, Callable[[Settings | None], Pipeline]] = {
    "placeholder": _placeholder,
    "cxr": _cxr,
    "ct": _ct,
    "chest": _chest,
}


def load_pipeline(spec: str, settings: Settings | None = None) -> Pipeline:
    """The pipeline named ``spec`` (built in), or ``module:callable`` returning one."""
    factory = PIPELINES.get(spec)
    if factory is not None:
        return factory(settings)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            made = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError([("worker.pipeline", f"cannot load {spec!r}: {exc}")]) from exc
        pipeline: Pipeline = made()
        return pipeline
    raise ConfigError([("worker.pipeline", f"unknown pipeline {spec!r}")])
