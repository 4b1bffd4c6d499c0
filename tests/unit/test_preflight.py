"""``config check`` fails, with exit code 2 and the key path, on everything ``serve`` would
fail on at start: model names, manifests, checksums, the models folder, TLS files.

The configurations name the repository's shipped models (their real manifests and
weights); a damaged copy of them is made where a test needs one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from support import write_config

from dicomnode.cli import EXIT_CONFIG, EXIT_OK, main
from dicomnode.config import load_settings
from dicomnode.errors import ConfigError
from dicomnode.ops import preflight

MODELS = Path(__file__).resolve().parents[2] / "models"


def _config(tmp_path: Path, models: Path = MODELS, **sections: Any) -> Path:
    cxr = {"models_dir": str(models), **sections.pop("cxr", {})}
    ct = {"models_dir": str(models), **sections.pop("ct", {})}
    worker = {"pipeline": "chest", "processes": 0, **sections.pop("worker", {})}
    return write_config(tmp_path, 11112, cxr=cxr, ct=ct, worker=worker, **sections)


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["config", "check", "--config", str(config)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_shipped_models_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = _check(_config(tmp_path), capsys)
    assert code == EXIT_OK, output
    assert "OK" in output and "pipeline chest" in output


@pytest.mark.parametrize(
    ("sections", "key", "words"),
    [
        ({"cxr": {"members": ["cxr-vgg16", "cxr-vgg61"]}}, "cxr.members[1]", "'cxr-vgg61'"),
        ({"cxr": {"lung_mask": "cxr-lung-unet2"}}, "cxr.lung_mask", "'cxr-lung-unet2'"),
        ({"cxr": {"explain_member": "cxr-vgg19x"}}, "cxr.explain_member", "'cxr-vgg19x'"),
        ({"cxr": {"stacking": "cxr-stack"}}, "cxr.stacking", "'cxr-stack'"),
        ({"cxr": {"detector": "cxr-boxes"}}, "cxr.detector", "'cxr-boxes'"),
        ({"ct": {"classifier": "ct-densenet"}}, "ct.classifier", "'ct-densenet'"),
        ({"ct": {"lung_mask": "cxr-vgg16"}}, "ct.lung_mask", "task 'classifier'"),
        ({"cxr": {"members": ["cxr-vgg16", "ct-densenet121"]}}, "cxr.members[1]", "task"),
        ({"cxr": {"explain_class": "tuberculosis"}}, "cxr.explain_class", "'tuberculosis'"),
        ({"worker": {"pipeline": "nosuch.module:make"}}, "worker.pipeline", "cannot load"),
    ],
)
def test_a_wrong_model_setting_fails_with_its_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sections: dict[str, Any],
    key: str,
    words: str,
) -> None:
    code, output = _check(_config(tmp_path, **sections), capsys)
    assert code == EXIT_CONFIG, output
    line = next((ln for ln in output.splitlines() if ln.strip().startswith(f"{key}:")), None)
    assert line is not None, output
    assert words in line
    assert "Traceback" not in output


def test_a_missing_models_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = _check(_config(tmp_path, models=tmp_path / "nowhere"), capsys)
    assert code == EXIT_CONFIG
    assert "cxr.models_dir: no such folder" in output
    assert "ct.models_dir: no such folder" in output


def test_damaged_weights_and_a_broken_manifest_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("*.png"))
    weights = models / "cxr-vgg19" / "model.keras"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (models / "ct-densenet121" / "manifest.toml").write_text("name = [unclosed\n")
    code, output = _check(_config(tmp_path, models=models), capsys)
    assert code == EXIT_CONFIG
    assert "cxr.members[1]: model 'cxr-vgg19'" in output
    assert "wrong or damaged weights file" in output
    assert "ct.classifier: model 'ct-densenet121'" in output and "not valid TOML" in output


def test_tls_files_that_do_not_load_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = _config(
        tmp_path,
        worker={"pipeline": "placeholder"},
        receive={"tls": {"certificate": "cert.pem", "private_key": "key.pem"}},
    )
    code, output = _check(config, capsys)
    assert code == EXIT_CONFIG
    assert "receive.tls.certificate:" in output and "does not load" in output


def test_serve_checks_the_models_only_when_it_runs_workers(tmp_path: Path) -> None:
    config = _config(tmp_path, cxr={"members": ["cxr-vgg61"]})
    settings = load_settings(config)
    preflight.check(settings)  # worker.processes = 0: serve loads no models
    with pytest.raises(ConfigError) as raised:
        preflight.check(settings, workers=True)
    assert [key for key, _ in raised.value.problems] == ["cxr.members[0]"]


def test_a_data_folder_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a folder\n")
    config = write_config(tmp_path, 11112, node={"data_dir": str(tmp_path / "plain-file" / "data")})
    with pytest.raises(ConfigError) as raised:
        preflight.check(load_settings(config))
    ((key, message),) = raised.value.problems
    assert key == "node.data_dir" and "plain-file" in message and "is not a folder" in message
