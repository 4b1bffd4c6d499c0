#!/usr/bin/env python3
"""Chest CT pipeline benchmark: a 300-slice study with the full-width DenseNet-121.

Usage::

    python3 bench/ct.py                    # 300 slices, batch 16
    python3 bench/ct.py --slices 60        # a quicker run
    python3 bench/ct.py --node             # also storescu -> node -> Orthanc, end to end
    KERAS_BACKEND=jax python3 bench/ct.py  # on the GPU machine

Builds DenseNet-121 with the seed 001 head (one sigmoid output) at full width with
random weights (timing only; never shipped), saves it with a ct-classifier manifest in
a temporary folder and loads it through the model registry as the node does. The study
is built from the real axial chest slices in ``../shared/data/dicom_ct`` (cycled, new
UIDs, positions 1.25 mm apart, written to a temporary folder and deleted afterwards).
It is run once to warm up, then timed: series selection (headers), decoding, lung
mask, preparation (these three in the reading threads, so their sums can exceed the
wall time), classification, Grad-CAM on the top slices, and the result objects
(SR + SCs, :func:`dicomnode.results.encode.encode`). ``total`` is the wall time from
the study's file list to the encoded objects. With ``--node`` the same study is then
sent with storescu to a real node (CT pipeline, Orthanc as the PACS) and timed from
storescu exiting to the SR and SCs stored in Orthanc, minus the CT quiet period.

Writes the table to ``bench/RESULTS.md`` under ``## ct``. Targets: at most 60 s on
the 2-core CPU, at most 5 s on an H100.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import keras  # noqa: E402
from results import RESULTS, machine_description, write_section  # noqa: E402

from dicomnode.config import CTSelectionSettings, CTSettings, OutputSettings  # noqa: E402
from dicomnode.inference.registry import configure_devices, sha256_of  # noqa: E402
from dicomnode.nets.ct import densenet121_sigmoid  # noqa: E402
from dicomnode.pipelines.ct import CTPipeline  # noqa: E402
from dicomnode.pipelines.types import StudyInput  # noqa: E402
from dicomnode.results.encode import encode  # noqa: E402

SINGLES = REPO.parent / "shared" / "data" / "dicom_ct" / "tcia_covid19_ny_sbu_single_slices"
#: Axial chest slices of the shared data (slices.csv: region "chest ...", not reformats).
CHEST_SLICES = (
    "A002304__axial__19001231-076.dcm",
    "A002304__axial__19010112-135.dcm",
    "A046441__axial__19001111-045.dcm",
    "A048383__axial__19001231-30.dcm",
    "A048383__axial__19010410-30.dcm",
    "A056642__axial__19001229-053.dcm",
    "A056642__axial__19010107-111.dcm",
    "A072894__axial__19010103-40.dcm",
)
#: CT quiet period of the node in the ``--node`` run (seconds).
QUIET_S = 2.0
STEPS = ("select", "decode", "lung_mask", "prepare", "classify", "gradcam", "results")
SIZE = 224


def build_model(root: Path) -> None:
    """The full-width DenseNet-121 + sigmoid head with a ct-classifier manifest."""
    folder = root / "ct-densenet121"
    folder.mkdir(parents=True)
    model = densenet121_sigmoid(input_size=SIZE, channels=3)
    model.save(folder / "model.keras")
    (folder / "manifest.toml").write_text(
        "\n".join(
            [
                'name = "ct-densenet121"',
                'version = "bench"',
                'task = "ct-classifier"',
                'architecture = "densenet121_sigmoid"',
                'device_uid = "1.2.826.0.1.3680043.10.999.2"',
                "threshold = 0.5",
                "[weights]",
                'file = "model.keras"',
                'format = "keras"',
                f'sha256 = "{sha256_of(folder / "model.keras")}"',
                "[input]",
                f"size = [{SIZE}, {SIZE}]",
                "channels = 3",
                "window_center = -600",
                "window_width = 1500",
                "[gradcam]",
                'layer = "relu"',
                "[[classes]]",
                'name = "covid19"',
                'code_value = "840539006"',
                'coding_scheme = "SCT"',
                'code_meaning = "COVID-19"',
                "",
            ]
        )
    )


def run_node(models: Path, paths: list[Path], tmp: Path) -> tuple[float, float, int]:
    """Send the study to a real node (CT pipeline, Orthanc as the PACS).

    Returns (seconds storescu took, seconds from storescu exiting to the SR and every SC
    in Orthanc minus the CT quiet period, result objects in Orthanc).
    """
    from support import NodeProcess, OrthancServer, free_port, storescu, write_config

    orthanc = OrthancServer(tmp / "orthanc")
    orthanc.start()
    node = None
    try:
        port = free_port()
        config = write_config(
            tmp / "node",
            port,
            quiet_period_s={"CT": QUIET_S},
            worker={"pipeline": "ct", "processes": 1},
            ct={"models_dir": str(models), "classifier": "ct-densenet121"},
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.port}
            ],
        )
        node = NodeProcess(config=config, port=port, log_path=tmp / "node.log")
        node.start(timeout=300)
        deadline = time.monotonic() + 300
        while "ct pipeline ready" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        started = time.monotonic()
        for run in storescu(paths, port, timeout=600):
            if run.returncode != 0:
                raise RuntimeError(run.stderr)
        sent = time.monotonic()
        deadline = sent + 900
        count = 0
        while time.monotonic() < deadline:
            count = sum(
                1
                for study in orthanc.get("/studies")
                for instance in orthanc.get(f"/studies/{study}/instances")
                if orthanc.get(f"/instances/{instance['ID']}/simplified-tags")["Modality"]
                in ("SR", "OT")
            )
            if count >= 4:
                break
            time.sleep(0.5)
        arrived = time.monotonic()
        if count < 4:
            raise TimeoutError(f"only {count} result objects arrived; see {tmp / 'node.log'}")
        return sent - started, arrived - sent - QUIET_S, count
    finally:
        if node is not None and node.proc is not None:
            node.stop(timeout=120)
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--node",
        action="store_true",
        help="also send the study through a real node to Orthanc (storescu -> SR + SCs)",
    )
    args = parser.parse_args()
    if not SINGLES.exists():
        print(f"{SINGLES} is absent: the benchmark builds its study from those slices")
        return 2
    from support import instance_inputs, synthetic_ct_series

    device = configure_devices()
    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-ct-"))
    try:
        started = time.perf_counter()
        build_model(tmp / "models")
        print(
            f"built and saved the full-width DenseNet-121 in {time.perf_counter() - started:.0f} s"
        )
        paths = synthetic_ct_series(
            [SINGLES / name for name in CHEST_SLICES], tmp / "study", args.slices
        )
        settings = CTSettings(
            models_dir=tmp / "models",
            classifier="ct-densenet121",
            batch_size=args.batch,
            selection=CTSelectionSettings(),
        )
        pipeline = CTPipeline(settings)
        started = time.perf_counter()
        pipeline.load()
        print(f"loaded, verified and warmed up in {time.perf_counter() - started:.0f} s")
        study = StudyInput(_study_uid(paths[0]), instance_inputs(paths))
        runs = []
        for label in ("warm-up", "timed"):
            started = time.perf_counter()
            outcome = pipeline.run(study)
            mid = time.perf_counter()
            objects = encode(outcome, study, OutputSettings())
            total = time.perf_counter() - started
            steps = dict(outcome.analysis.timings)
            steps["results"] = time.perf_counter() - mid
            runs.append((label, total, steps, len(objects)))
            print(
                f"{label}: {total:.1f} s for {args.slices} slices ("
                + ", ".join(f"{k} {steps.get(k, 0):.2f}" for k in STEPS)
                + f"); {len(outcome.analysis.slice_probabilities)} classified, "
                f"{len(objects)} result objects"
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        load = os.getloadavg()[0]
        node_row = None
        if args.node:
            del pipeline  # free the in-process model before the node loads its own
            store_s, beyond_s, count = run_node(tmp / "models", paths, tmp)
            node_row = (store_s, beyond_s, count)
            print(
                f"node: storescu {store_s:.1f} s, then {beyond_s:.1f} s beyond the {QUIET_S} s "
                f"quiet period to {count} result objects in Orthanc"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _, total, steps, count = runs[-1]
    header = "| slices | total s | " + " | ".join(STEPS) + " | slices/s | peak RSS MiB |"
    table = [
        header,
        "|" + "---|" * (len(STEPS) + 4),
        f"| {args.slices} | {total:.1f} | "
        + " | ".join(f"{steps.get(k, 0):.2f}" for k in STEPS)
        + f" | {args.slices / total:.1f} | {peak:.0f} |",
    ]
    if node_row is not None:
        store_s, beyond_s, count = node_row
        table += [
            "",
            "| through the node (`--node`) | storescu s | storescu done -> SR + SCs in Orthanc, "
            "minus quiet period, s | result objects |",
            "|---|---|---|---|",
            f"| {args.slices} slices, one association | {store_s:.1f} | {beyond_s:.1f} | {count} |",
        ]
    print("\n".join(table))
    if not args.no_write:
        write_section(
            RESULTS,
            "## ct",
            [
                "## ct",
                "",
                f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine_description()}; Keras {keras.__version__}, {device}",
                f"- command: `python3 bench/ct.py --slices {args.slices} --batch {args.batch}"
                f"{' --node' if args.node else ''}`",
                f"- a {args.slices}-slice axial chest CT study built from the 8 real axial chest "
                "slices of ../shared/data/dicom_ct (512 x 512, cycled, new UIDs, 1.25 mm apart); "
                f"full-width DenseNet-121 + sigmoid head, random weights, {SIZE} x {SIZE} x 3, "
                f"batch {args.batch}; classical HU lung mask; 3 evidence slices with Grad-CAM; "
                f"SR + 3 SCs encoded; second run (after a warm-up run); {count} result objects",
                f"- 1-minute load average at the end of the timed run: {load:.1f} on "
                f"{os.cpu_count()} CPUs (other work shared the machine when above "
                f"{os.cpu_count()})",
                "- seconds; decode, lung_mask and prepare are summed over the reading threads "
                "(they overlap each other and classification), the other steps are wall time",
                "- targets: at most 60 s on this 2-core CPU; at most 5 s on an H100. No GPU was "
                "lent to this task: the GPU row is still to be measured "
                "(`KERAS_BACKEND=jax python3 bench/ct.py` on the device machine)",
                "",
                *table,
                "",
            ],
        )
    return 0


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


if __name__ == "__main__":
    sys.exit(main())
