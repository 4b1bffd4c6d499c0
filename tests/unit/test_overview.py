"""The status page's model list and cards come from the configured models' manifests."""

from __future__ import annotations

from pathlib import Path

from support import write_config

from dicomnode.config import load_settings
from dicomnode.ops.overview import configured_models, model_card

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_chest_pipeline_lists_its_models_with_versions_and_cards(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        11112,
        worker={"pipeline": "chest"},
        cxr={"models_dir": str(MODELS), "strategy": "stacking", "stacking": "cxr-stacking"},
        ct={"models_dir": str(MODELS)},
    )
    settings = load_settings(config)
    rows = {m.name: m for m in configured_models(settings)}
    assert set(rows) == {
        "cxr-lung-unet",
        "cxr-vgg16",
        "cxr-vgg19",
        "cxr-inceptionv3",
        "cxr-stacking",
        "cxr-opacity-detector",
        "ct-densenet121",
    }
    assert all(m.has_card and m.problem is None and m.version for m in rows.values())
    assert rows["ct-densenet121"].task == "ct-classifier"
    card = model_card(settings, "cxr-vgg16")
    assert card is not None and card == (MODELS / "cxr-vgg16" / "MODEL_CARD.md").read_text()
    assert model_card(settings, "../config") is None
    assert model_card(settings, "cxr-no-such") is None


def test_the_placeholder_pipeline_has_no_models(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, 11112))
    assert configured_models(settings) == []
    assert model_card(settings, "cxr-vgg16") is None
