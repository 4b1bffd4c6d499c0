"""The model code runs under ``KERAS_BACKEND=jax`` too (the GPU machine has JAX, no TensorFlow).

Runs the registry, Grad-CAM, CXR and CT pipeline and tiny-architecture tests again in a
subprocess with the JAX backend. Skips when JAX is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="JAX is not installed (pip install jax)")

TESTS = Path(__file__).resolve().parent


def test_model_code_passes_its_tests_on_the_jax_backend() -> None:
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(TESTS / "test_models.py"),
            str(TESTS / "test_cxr_pipeline.py"),
            str(TESTS / "test_ct_pipeline.py"),
            # Every architecture, tiny: builds and predicts (the full nets file takes
            # minutes under JAX on this CPU, for XLA compilation).
            str(TESTS / "test_nets.py"),
            "-k",
            "not nets or outputs_and_gradcam_layer or reloads",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=TESTS.parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
