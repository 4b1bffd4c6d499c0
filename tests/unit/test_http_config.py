"""``[http]``: off unless a port is given; its bind and port are checked like [node]'s."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import write_config

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError


def test_http_is_off_when_absent_or_port_0(tmp_path: Path) -> None:
    assert not load_settings(write_config(tmp_path / "a", 11112)).http.enabled
    settings = load_settings(write_config(tmp_path / "b", 11112, http={"port": 0}))
    assert not settings.http.enabled


def test_http_on_a_port(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, 11112, http={"port": 8080}))
    assert settings.http.enabled
    assert (settings.http.bind, settings.http.port) == ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("http", "key", "words"),
    [
        ({"port": 11112}, "http.port", "must differ from node.port"),
        ({"port": 70000}, "http.port", "between 0 and 65535"),
        ({"port": 8080, "bind": "every-interface"}, "http.bind", "IP address"),
        ({"port": 8080, "listen": "x"}, "http.listen", "not a known setting"),
    ],
)
def test_http_mistakes_name_their_key(
    tmp_path: Path, http: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write_config(tmp_path, 11112, http=http))
    problems = dict(raised.value.problems)
    assert key in problems and words in problems[key]
