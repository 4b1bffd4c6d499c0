"""Memory stays bounded on long CT series: a 600-slice series costs little more than 20.

The test builds a 600-slice series from one real chest slice (new UIDs and positions)
and runs the CT pipeline on it in a fresh subprocess, then does the same with a
20-slice series, and reads each process's peak resident memory (``ru_maxrss``).

The bound, and why: a 512 x 512 slice is 0.5 MiB as stored (int16) and 1 MiB as
float32 HU, so holding the 600-slice volume even once would add about 300 MiB (int16)
to 600 MiB (float32) over the 20-slice run. The streaming pipeline keeps per slice a
header and a few numbers (a few KiB) and at most one chunk of 64 classifier crops
(64 x 64 bytes here); decoding buffers are per slice and per reading thread. So the
600-slice peak may exceed the 20-slice peak by at most **100 MiB** (a third of one int16
copy of the volume), and the whole process (Python, TensorFlow, the tiny model) stays
under an absolute **1,200 MiB** (TensorFlow alone is most of it). Measured on the 2-core
CI machine: 780 to 794 MiB for 20 slices, 5 to 9 MiB more for 600.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO_ROOT, node_env, shared_data, synthetic_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Allowed growth of the peak from 20 to 600 slices, and the absolute peak (MiB).
GROWTH_BOUND_MIB = 100
PEAK_BOUND_MIB = 1200

_PROBE = """
import json, resource, sys
from pathlib import Path
from pydicom import dcmread
from dicomnode.config import CTSelectionSettings, CTSettings
from dicomnode.pipelines.types import InstanceInput, StudyInput
from dicomnode.pipelines.ct import CTPipeline

models, folder = Path(sys.argv[1]), Path(sys.argv[2])
instances = []
for path in sorted(folder.iterdir()):
    ds = dcmread(path, stop_before_pixels=True)
    instances.append(InstanceInput(path, ds.SOPInstanceUID, ds.SOPClassUID,
        ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined, None, None, ds.Rows, ds.Columns))
    study_uid = ds.StudyInstanceUID
pipeline = CTPipeline(CTSettings(models_dir=models, classifier="ct-tiny",
    selection=CTSelectionSettings(min_slices=10)))
pipeline.load()
del ds
result = pipeline.analyse(StudyInput(study_uid, tuple(instances)))
print(json.dumps({
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "read": result.slices_read,
    "classified": len(result.slice_probabilities),
    "evidence": len(result.evidence),
}))
"""


def _probe(models: Path, folder: Path) -> dict[str, float]:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(models), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env=node_env({"TF_CPP_MIN_LOG_LEVEL": "2"}),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def test_600_slice_series_runs_in_bounded_memory(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from fixture_models import write_ct_model

    source = shared_data(
        "dicom_ct", "tcia_covid19_ny_sbu_single_slices", "A048383__axial__19010410-30.dcm"
    )
    models = write_ct_model(tmp_path / "models")
    synthetic_ct_series([source], tmp_path / "small", 20)
    synthetic_ct_series([source], tmp_path / "big", 600, spacing_mm=0.625)
    small = _probe(models, tmp_path / "small")
    big = _probe(models, tmp_path / "big")
    assert small["read"] == small["classified"] == 20
    assert big["read"] == big["classified"] == 600 and big["evidence"] == 3
    growth = big["peak_mib"] - small["peak_mib"]
    print(f"peak RSS: 20 slices {small['peak_mib']:.0f} MiB, 600 slices {big['peak_mib']:.0f} MiB")
    assert growth < GROWTH_BOUND_MIB, (small, big)
    assert big["peak_mib"] < PEAK_BOUND_MIB, big
