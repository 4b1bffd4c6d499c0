"""``dicomnode evaluate``: re-measure a trained model with the target that made it.

Apart from the package's ``__init__`` (the targets' registry), which the export module
imports: the registry does not import the export module back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.training import TrainingError, get_target
from dicomnode.training.export import MANIFEST_FILE, training_table


def evaluate_model(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Re-measure the model in ``model_dir`` with the target named in its manifest.

    The manifest's ``[training]`` table says which target made the model; that
    target's ``evaluate`` rewrites the card, ``metrics.json`` and the plots.
    """
    manifest = Path(model_dir) / MANIFEST_FILE
    if not manifest.is_file():
        raise TrainingError(f"no {MANIFEST_FILE} in {str(model_dir)!r}")
    name = training_table(manifest).get("target")
    if not isinstance(name, str):
        raise TrainingError(
            f"{str(manifest)!r} has no [training] 'target': it was not trained by "
            "`dicomnode train`, so `dicomnode evaluate` does not know how to measure it"
        )
    target = get_target(name)
    if target.evaluate is None:
        raise TrainingError(f"training target {name!r} has no evaluation")
    return target.evaluate(Path(model_dir), Path(data_dir))
