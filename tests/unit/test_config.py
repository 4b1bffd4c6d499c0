"""Configuration: the shipped default is valid; every mistake names its key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import load_settings, parse_settings
from dicomnode.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_default_config_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "config.toml")
    assert settings.node.bind == "127.0.0.1"
    assert settings.database.url.startswith("sqlite:///")
    assert settings.node.data_dir == (REPO_ROOT / "data").resolve()
    assert settings.completion.quiet_period_for("CT") > settings.completion.quiet_period_for("CR")
    assert (
        settings.completion.quiet_period_for("MR") == settings.completion.quiet_period_s["default"]
    )
    assert [d.name for d in settings.destinations] == ["pacs"]


def _problems(data: dict, tmp_path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, base_dir=tmp_path, source=None)
    return dict(info.value.problems)


def test_every_mistake_is_reported_with_key_path_and_value(tmp_path: Path) -> None:
    problems = _problems(
        {
            "node": {"ae_title": "A" * 17, "port": 70000, "prot": 1},
            "receive": {"allow_unknown_callers": "yes", "callers": [{"ae_title": "OK", "hots": 1}]},
            "completion": {"quiet_period_s": {"CT": -1}, "late_instance_policy": "sometimes"},
            "destinations": [{"name": "pacs", "host": "127.0.0.1", "port": "4242"}],
            "extra": {},
        },
        tmp_path,
    )
    assert "'AAAAAAAAAAAAAAAAA'" in problems["node.ae_title"]
    assert "70000" in problems["node.port"]
    assert "not a known setting" in problems["node.prot"]
    assert "'yes'" in problems["receive.allow_unknown_callers"]
    assert "not a known setting" in problems["receive.callers[0].hots"]
    assert "-1" in problems["completion.quiet_period_s.CT"]
    assert "'sometimes'" in problems["completion.late_instance_policy"]
    assert "required" in problems["destinations[0].ae_title"]
    assert "'4242'" in problems["destinations[0].port"]
    assert "not a known setting" in problems["extra"]


def test_no_callers_and_unknown_refused_is_an_error(tmp_path: Path) -> None:
    problems = _problems({"receive": {"allow_unknown_callers": False}}, tmp_path)
    assert "no peer could send" in problems["receive.callers"]


def test_force_complete_shorter_than_quiet_period(tmp_path: Path) -> None:
    problems = _problems(
        {
            "receive": {"allow_unknown_callers": True},
            "completion": {"force_complete_s": 5, "quiet_period_s": {"CT": 60}},
        },
        tmp_path,
    )
    assert "60" in problems["completion.force_complete_s"]


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "config.toml"
    path.write_text('[node]\ndata_dir = "store"\n[receive]\nallow_unknown_callers = true\n')
    settings = load_settings(path)
    assert settings.node.data_dir == (tmp_path / "site" / "store").resolve()
    store = (tmp_path / "site" / "store").resolve()
    assert settings.database.url == f"sqlite:///{store}/dicomnode.db"


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_postgresql_url_uses_psycopg3(tmp_path: Path) -> None:
    settings = parse_settings(
        {"database": {"url": "postgresql://u@h/db"}, "receive": {"allow_unknown_callers": True}},
        base_dir=tmp_path,
        source=None,
    )
    assert settings.database.url == "postgresql+psycopg://u@h/db"


def test_container_config_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "deploy" / "config.container.toml")
    assert settings.node.bind == "0.0.0.0"
    assert settings.database.url.startswith("postgresql+psycopg://")


def test_queue_and_worker_mistakes_are_named(tmp_path: Path) -> None:
    problems = _problems(
        {
            "receive": {"allow_unknown_callers": True},
            "queue": {
                "heartbeat_interval_s": 10,
                "stalled_after_s": 15,
                "priority": [{"priority": 5}, {"modality": "CT"}],
            },
            "worker": {"pipeline": "not a pipeline!", "threads": 0},
            "outbox": {"max_age_s": 0},
        },
        tmp_path,
    )
    assert "twice" in problems["queue.stalled_after_s"]
    assert "at least one of" in problems["queue.priority[0]"]
    assert "required" in problems["queue.priority[1].priority"]
    assert "'not a pipeline!'" in problems["worker.pipeline"]
    assert "0" in problems["worker.threads"]
    assert "0" in problems["outbox.max_age_s"]


def test_priority_rules_are_parsed(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "receive": {"allow_unknown_callers": True},
            "queue": {"priority": [{"priority": 10, "calling_ae_title": "ER_CT"}]},
        },
        base_dir=tmp_path,
        source=None,
    )
    [rule] = settings.queue.priorities
    assert rule.priority == 10 and rule.calling_ae_title == "ER_CT" and rule.modality is None
