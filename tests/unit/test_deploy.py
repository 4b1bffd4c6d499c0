"""The container's configuration and the compose file, checked as far as this machine allows.

No image can be built or pulled here, so the image's file system is mapped into a
temporary folder: the paths of deploy/config.container.toml that the Dockerfile creates
(/opt/dicomnode for the code and models, /etc/dicomnode for the configuration,
/var/lib/dicomnode for the data) are rewritten to folders there, with the repository's
models where the Dockerfile copies them. The configuration must then load, name the
chest pipeline and pass every start-up check ``serve`` makes (manifests, checksums).
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError
from dicomnode.ops import preflight

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose file (pip install pyyaml)")


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _image_paths() -> dict[str, str]:
    """Where the Dockerfile puts the models and the configuration inside the image."""
    text = _dockerfile()
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)
    models = re.search(r"^COPY models (\S+)$", text, re.M)
    config = re.search(r"^COPY deploy/config\.container\.toml (\S+)$", text, re.M)
    assert workdir and models and config, "the Dockerfile no longer copies models and config"
    models_path = models.group(1)
    if not models_path.startswith("/"):
        models_path = str(Path(workdir.group(1)) / models_path)
    return {"models": str(Path(models_path)), "config": config.group(1)}


def _mapped_container_config(root: Path) -> Path:
    """deploy/config.container.toml inside a copy of the image's layout under ``root``."""
    paths = _image_paths()
    models = root / paths["models"].lstrip("/")
    models.parent.mkdir(parents=True)
    shutil.copytree(REPO / "models", models)
    config = root / paths["config"].lstrip("/")
    config.parent.mkdir(parents=True)
    text = (DEPLOY / "config.container.toml").read_text()
    for prefix in ("/opt/dicomnode", "/var/lib/dicomnode", "/etc/dicomnode"):
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
    config.write_text(text)
    return config


def test_container_config_runs_the_chest_pipeline_with_the_shipped_models(
    tmp_path: Path,
) -> None:
    config = _mapped_container_config(tmp_path)
    settings = load_settings(config)
    models = tmp_path / _image_paths()["models"].lstrip("/")
    assert settings.worker.pipeline == "chest"
    assert settings.worker.processes >= 1
    assert settings.cxr.models_dir == models.resolve()
    assert settings.ct.models_dir == models.resolve()
    assert settings.node.data_dir == (tmp_path / "var/lib/dicomnode").resolve()
    assert settings.database.url.startswith("postgresql+psycopg://")
    for name in (settings.cxr.lung_mask, *settings.cxr.members, settings.ct.classifier):
        assert (models / name / "manifest.toml").is_file(), name
    # Everything serve checks before it receives: manifests, tasks, SHA-256 of the weights.
    preflight.check(settings)
    assert settings.http.enabled and settings.http.bind == "0.0.0.0"


def test_container_config_without_the_mapping_points_at_the_image_paths() -> None:
    text = (DEPLOY / "config.container.toml").read_text()
    models = _image_paths()["models"]
    assert re.findall(r'^models_dir = "(.*)"$', text, re.M) == [models, models]
    assert re.search(r'^pipeline = "chest"$', text, re.M)


def test_a_wrong_models_path_in_the_container_config_fails_the_start_up_checks(
    tmp_path: Path,
) -> None:
    config = _mapped_container_config(tmp_path)
    config.write_text(config.read_text().replace("/opt/dicomnode/models", "/etc/dicomnode/models"))
    with pytest.raises(ConfigError) as raised:
        preflight.check(load_settings(config))
    keys = [key for key, _ in raised.value.problems]
    assert "cxr.models_dir" in keys and "ct.models_dir" in keys


def test_compose_file_wires_node_pacs_database_and_viewer() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"node", "orthanc", "postgres"}
    node = services["node"]
    assert (REPO / node["build"]["context"].replace("..", ".")).exists()
    assert (DEPLOY.parent / node["build"]["dockerfile"]).is_file()
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "nodedata:/var/lib/dicomnode" in node["volumes"]
    for volume in ("nodedata", "pgdata"):
        assert volume in compose["volumes"]

    text = (DEPLOY / "config.container.toml").read_text()
    config = tomllib.loads(text)
    # The node's DICOM and HTTP ports are the ones published.
    published = {p.rsplit(":", 1)[-1] for p in node["ports"]}
    assert {str(config["node"]["port"]), str(config["http"]["port"])} <= published
    # The database URL names the compose service, user, password and database.
    pg = services["postgres"]["environment"]
    assert config["database"]["url"] == (
        f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{pg['POSTGRES_DB']}"
    )
    # Results go to the Orthanc service, which knows the node under its AE title.
    (destination,) = config["destinations"]
    orthanc = services["orthanc"]["environment"]
    assert destination["host"] == "orthanc"
    assert destination["ae_title"] == orthanc["ORTHANC__DICOM_AET"]
    assert f"{destination['port']}:{destination['port']}" in services["orthanc"]["ports"]
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert [config["node"]["ae_title"], "node", config["node"]["port"]] in modalities.values()
    callers = {c["ae_title"] for c in config["receive"]["callers"]}
    assert orthanc["ORTHANC__DICOM_AET"] in callers
    # The viewer: OHIF served by Orthanc beside its DICOMweb (same origin, no CORS).
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == orthanc["OHIF_PLUGIN_ENABLED"] == "true"
    assert "8042:8042" in services["orthanc"]["ports"]


def test_dockerfile_health_check_asks_the_configured_http_port() -> None:
    config = tomllib.loads((DEPLOY / "config.container.toml").read_text())
    text = _dockerfile()
    assert f"127.0.0.1:{config['http']['port']}/readyz" in text
    assert re.search(rf"^EXPOSE .*\b{config['http']['port']}\b", text, re.M)
