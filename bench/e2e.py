#!/usr/bin/env python3
"""End-to-end benchmark: from storescu finishing to the SR and SC stored in Orthanc.

Usage::

    python3 bench/e2e.py            # 3 single studies, then 20 back to back
    python3 bench/e2e.py --quick    # 2 single studies, then 5 back to back

Starts Orthanc (the PACS) and the node (chest X-ray pipeline with the full-width seed
architectures, random weights, built as in ``bench/pipeline.py``; SR and Grad-CAM SC
outputs; Orthanc as the destination). Each study is a copy of a 1024 x 1024 chest CR
with new UIDs. For one-image studies it measures the time from ``storescu`` exiting
to both result objects being in Orthanc, minus the configured CR quiet period; then it
sends N studies back to back and reports studies per minute until all results arrived.
Prints a table and writes it to ``bench/RESULTS.md`` under ``## e2e``.
Target on the 2-core CPU: at most 5 s per study beyond the quiet period.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from pipeline import build_models  # noqa: E402
from results import RESULTS, machine_description, write_section  # noqa: E402
from support import NodeProcess, OrthancServer, dcmtk, free_port, write_config  # noqa: E402

QUIET_S = 2.0
SOURCE = (
    REPO.parent
    / "shared"
    / "data"
    / "dicom_cxr"
    / "chest"
    / ("1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
)


def new_study(folder: Path) -> tuple[Path, str]:
    """A copy of the source radiograph as a new one-image study; returns path and UID."""
    ds = dcmread(SOURCE)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path, str(ds.StudyInstanceUID)


def send(path: Path, port: int) -> None:
    subprocess.run(
        [dcmtk("storescu"), "-xy", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def results_in_orthanc(orthanc: OrthancServer, study_uid: str) -> int:
    """How many of the node's objects (SR + SC) Orthanc holds for the study."""
    count = 0
    for study in orthanc.get("/studies?expand"):
        if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
            continue
        for series in study["Series"]:
            modality = orthanc.get(f"/series/{series}")["MainDicomTags"].get("Modality")
            if modality in ("SR", "OT"):
                count += len(orthanc.get(f"/series/{series}")["Instances"])
    return count


def wait_results(orthanc: OrthancServer, uids: list[str], timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(results_in_orthanc(orthanc, uid) >= 2 for uid in uids):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("results did not arrive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not SOURCE.exists():
        print(f"{SOURCE} is absent (../shared/data)")
        return 2
    singles, batch = (2, 5) if args.quick else (3, 20)
    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-e2e-"))
    orthanc = OrthancServer(tmp / "orthanc")
    node = None
    try:
        build_models(tmp / "models")
        orthanc.start()
        port = free_port()
        config = write_config(
            tmp / "node",
            port,
            quiet_period_s={"CR": QUIET_S, "DX": QUIET_S},
            worker={"pipeline": "cxr", "processes": 1},
            cxr={
                "models_dir": str(tmp / "models"),
                "lung_mask": "lung",
                "members": ["vgg16_classifier", "vgg19_classifier", "inceptionv3_classifier"],
                "explain_member": "vgg16_classifier",
            },
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.port}
            ],
        )
        node = NodeProcess(config=config, port=port, log_path=tmp / "node.log")
        node.start(timeout=300)
        deadline = time.monotonic() + 300
        while "cxr pipeline ready" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        latencies = []
        for i in range(singles):
            path, uid = new_study(tmp / "in" / f"s{i}")
            send(path, port)
            sent = time.monotonic()
            arrived = wait_results(orthanc, [uid])
            latencies.append(arrived - sent - QUIET_S)
            print(f"study {i + 1}: {latencies[-1]:.2f} s beyond the quiet period")
        studies = [new_study(tmp / "in" / f"b{i}") for i in range(batch)]
        started = time.monotonic()
        for path, _ in studies:
            send(path, port)
        arrived = wait_results(orthanc, [uid for _, uid in studies])
        per_minute = batch / ((arrived - started) / 60)
        print(f"{batch} studies back to back: {per_minute:.1f} studies/min")
    finally:
        if node is not None and node.proc is not None:
            node.stop(timeout=120)
        orthanc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    table = [
        "| measure | value |",
        "|---|---|",
        f"| one-image study, storescu done to SR + SC in Orthanc, minus quiet period "
        f"(median of {singles}) | {statistics.median(latencies):.2f} s |",
        f"| {batch} one-image studies back to back | {per_minute:.1f} studies/min |",
    ]
    print("\n".join(table))
    if not args.no_write:
        write_section(
            RESULTS,
            "## e2e",
            [
                "## e2e",
                "",
                f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine_description()}",
                f"- command: `python3 bench/e2e.py{' --quick' if args.quick else ''}`",
                "- node: 1 receiving process, 1 worker process, SQLite; CXR pipeline with the "
                "full-width seed architectures (random weights), SR + Grad-CAM SC to Orthanc; "
                f"CR quiet period {QUIET_S} s; source a 1024 x 1024 JPEG-baseline CR",
                "- target: at most 5 s per study beyond the quiet period",
                "",
                *table,
                "",
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
