"""``status`` shows what the analysis of a study found, not only its state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import queue_studies, write_config

from dicomnode.cli import EXIT_OK, main
from dicomnode.config import load_settings
from dicomnode.db import Database
from dicomnode.queue import claim, finish

SUMMARY = {
    "pipeline": "cxr",
    "images": [
        {
            "sop_instance_uid": "1.2.3.4",
            "probabilities": {"covid19": 0.7, "normal": 0.2, "pneumonia": 0.1},
            "boxes": [{"x": 1, "y": 2, "width": 3, "height": 4, "confidence": None}],
            "box_method": "gradcam",
        }
    ],
}


def test_status_prints_probabilities_and_boxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    config = write_config(tmp_path, 11112, database={"url": url})
    db = Database(url)
    db.migrate()
    (uid,) = queue_studies(db, load_settings(config), 1)
    job = claim(db, "w")
    assert job is not None and finish(db, job, "w", [], [], SUMMARY)
    capsys.readouterr()

    assert main(["status", "--config", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    line = "CXR 1.2.3.4: covid19 0.70, normal 0.20, pneumonia 0.10; 1 box(es) by gradcam: [1,2 3x4]"
    assert line in out
    assert out.index(uid) < out.index(line)

    assert main(["status", "--json", "--config", str(config)]) == EXIT_OK
    (study,) = json.loads(capsys.readouterr().out)["studies"]
    assert study["findings"] == [line]
