"""deploy/: the compose file and the systemd unit name only settings mailbot knows, with values it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from mailbot.settings import SHIPPED_RULES, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(autouse=True)
def no_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the working tree mixed in


def checked(environment: dict[str, str]) -> None:
    """Load the settings as the daemon would; a typo'd name is a warning, a bad value an error."""
    known_folder = {"MAILBOT_RULES": str(SHIPPED_RULES)} if "MAILBOT_RULES" in environment else {}
    settings = load_settings({**environment, **known_folder}, env_file=None)
    assert settings.warnings == (), settings.warnings


def test_the_compose_file_runs_two_daemons_on_one_postgresql_with_known_settings():
    compose = YAML(typ="safe").load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    daemons = {name: service for name, service in compose["services"].items() if name.startswith("mailbot")}
    assert len(daemons) == 2
    urls = set()
    for service in daemons.values():
        environment = {key: str(value) for key, value in service["environment"].items()}
        checked(environment)
        urls.add(environment["MAILBOT_DB"])
    assert len(urls) == 1 and urls.pop().startswith("postgresql://")


@pytest.mark.parametrize("name", ["mailbot.env.example"])
def test_the_systemd_environment_file_names_known_settings(name: str):
    lines = (DEPLOY / "systemd" / name).read_text(encoding="utf-8").splitlines()
    environment = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    checked(environment)
    unit = (DEPLOY / "systemd" / "mailbot.service").read_text(encoding="utf-8")
    assert "EnvironmentFile=/etc/mailbot/mailbot.env" in unit and "ExecStart=/opt/mailbot/bin/mailbot run" in unit
