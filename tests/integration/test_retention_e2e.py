"""``serve`` with ``[retention]``: a study analysed and delivered (here: nothing to deliver)
is deleted once its age passes, files and rows; with retention off it stays."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from support import make_instance, running_node, storescu

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
@pytest.mark.parametrize("retention", [True, False])
def test_serve_deletes_a_finished_study_after_its_age(tmp_path: Path, retention: bool) -> None:
    sections = {"worker": {"processes": 1, "pipeline": "placeholder"}}
    if retention:
        sections["retention"] = {"delete_after_s": 2, "check_interval_s": 1}
    with running_node(tmp_path, **sections) as node:  # type: ignore[arg-type]
        path = make_instance(tmp_path / "in", modality="CR")
        uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        (run,) = storescu([path], node.port)
        assert run.returncode == 0, run.stderr
        folder = node.data_dir / "instances" / uid
        assert folder.is_dir()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f"done: study {uid}" not in node.log():
            time.sleep(0.3)
        assert f"done: study {uid}" in node.log(), node.log()[-2000:]
        deadline = time.monotonic() + (20 if retention else 5)
        while time.monotonic() < deadline and uid in node.studies():
            time.sleep(0.5)
        if retention:
            assert uid not in node.studies(), node.log()[-2000:]
            assert not folder.exists()
            log = node.log()
            assert log.index(f"done: study {uid}") < log.index(f"retention: deleted study {uid}")
        else:
            assert node.studies()[uid]["state"] == "done" and folder.is_dir()
