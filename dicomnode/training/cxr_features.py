"""Frozen MobileNetV2 features of the assembled CXR set, cached and resumable.

An image's *view* is how its grey pixels become the network's input: ``whole`` (the
image resized) or ``lung`` (the node's lung crop, :func:`dicomnode.training.cxr_data.lung_crops`),
then :func:`dicomnode.inference.cxr_domain.model_input` (the node's own step):
:func:`~dicomnode.inference.cxr_domain.normalise_intensity` (``none`` or ``equalise``),
resized (area) to ``size``, repeated on three channels and scaled by 1/255. Features are
the pooled 1,280 backbone values of :func:`dicomnode.nets.mobilenet.mobilenetv2_classifier`
with the ImageNet weights. They are cached per view, normalisation and size in
``build/cache/cxr-mobilenet-features/`` (ignored by git), keyed by the image path relative
to the data root, and saved every :data:`SAVE_EVERY` images, so a killed run resumes.

Run: ``python3 -m dicomnode.training.cxr_features --data ../shared/data --view whole
--normalise equalise --size 224``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dicomnode.inference.cxr_domain import model_input
from dicomnode.training.data import read_grey

log = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parents[2] / "build" / "cache" / "cxr-mobilenet-features"
SAVE_EVERY = 256
VIEWS = ("whole", "lung")


__all__ = ["features", "model_input", "views"]


def views(paths: Sequence[Path], keys: Sequence[str], view: str) -> list[np.ndarray]:
    """The grey pixels the network starts from: the whole image or the node's lung crop."""
    greys = [read_grey(p) for p in paths]
    if view == "whole":
        return greys
    if view == "lung":
        from dicomnode.training.cxr_data import lung_crops

        crops, _ = lung_crops(greys, list(keys), 256)
        return list(crops)
    raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")


def _load(cache_file: Path) -> dict[str, np.ndarray]:
    if not cache_file.is_file():
        return {}
    with np.load(cache_file) as data:
        return dict(zip(data["keys"].tolist(), data["features"], strict=True))


def _save(cache_file: Path, cache: dict[str, np.ndarray]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.stem}.tmp.npz")
    np.savez(tmp, keys=np.array(list(cache)), features=np.stack(list(cache.values())))
    tmp.replace(cache_file)


def cache_path(view: str, normalise: str, size: int, cache_dir: Path = CACHE) -> Path:
    return cache_dir / f"{view}-{normalise}-{size}.npz"


def features(
    paths: Sequence[Path],
    keys: Sequence[str],
    *,
    view: str = "whole",
    normalise: str = "equalise",
    size: int = 224,
    cache_dir: Path | None = CACHE,
    batch_size: int = 32,
    backbone: Path | None = None,
) -> np.ndarray:
    """``(n, 1280)`` pooled ImageNet-MobileNetV2 features of ``paths`` (cached under ``keys``)."""
    cache_file = cache_path(view, normalise, size, cache_dir) if cache_dir else None
    cache = _load(cache_file) if cache_file else {}
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        import keras

        from dicomnode.nets.mobilenet import (
            load_imagenet_backbone,
            mobilenetv2_classifier,
            pooled_feature_model,
        )

        if backbone is None:
            raise ValueError("features missing from the cache and no backbone folder given")
        model = mobilenetv2_classifier(size)
        load_imagenet_backbone(model, backbone)
        extractor = pooled_feature_model(model)
        started, done = time.monotonic(), 0
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            greys = views([paths[i] for i in chunk], [keys[i] for i in chunk], view)
            x = np.stack([model_input(g, size, normalise) for g in greys])
            out = np.asarray(extractor(keras.ops.convert_to_tensor(x), training=False))
            for i, row in zip(chunk, out, strict=True):
                cache[keys[i]] = row.astype(np.float32)
            done += len(chunk)
            if cache_file and (done % SAVE_EVERY < batch_size or done == len(missing)):
                _save(cache_file, cache)
                rate = done / (time.monotonic() - started)
                log.info("%s: %d/%d images (%.1f/s)", cache_file.name, done, len(missing), rate)
    return np.stack([cache[key] for key in keys])


def main(argv: Sequence[str] | None = None) -> int:
    from dicomnode.nets.mobilenet import IMAGENET_BACKBONE_DIR
    from dicomnode.training.cxr_multisource import assemble, read_folders

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--view", choices=VIEWS, default="whole")
    parser.add_argument("--normalise", default="equalise")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--extra",
        type=Path,
        nargs="*",
        default=[],
        help="more image files (e.g. OOD probes), keyed by their path",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = args.data.resolve()
    assembly = assemble(read_folders(root))
    paths = [i.path for i in assembly.images] + [p.resolve() for p in args.extra]
    keys = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
    out = features(
        paths,
        keys,
        view=args.view,
        normalise=args.normalise,
        size=args.size,
        backbone=root / IMAGENET_BACKBONE_DIR,
    )
    log.info("features %s", out.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
