"""Settings: every bad value names its variable, .env gives defaults, the environment wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbot.settings import SHIPPED_RULES, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env from the working tree
    return tmp_path


def test_defaults():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.smtp_listen == ("127.0.0.1", 2525)
    assert settings.lmtp_listen is None
    assert settings.imap_port == 993 and settings.smtp_port == 587
    assert settings.rules_dir == SHIPPED_RULES


def test_values_from_the_environment():
    settings = load_settings({
        "MAILBOT_DB": "postgresql://mailbot@db.example/mailbot",
        "MAILBOT_IMAP_HOST": "imap.example",
        "MAILBOT_IMAP_USER": "inquiries",
        "MAILBOT_IMAP_TLS": "STARTTLS",
        "MAILBOT_SMTP_LISTEN": "[::1]:25",
        "MAILBOT_LMTP_LISTEN": "0.0.0.0:24",
        "MAILBOT_WORKER_SECONDS": "0.5",
        "MAILBOT_WORKERS": "3",
        "MAILBOT_SMTP_CONNECTIONS": "2",
        "MAILBOT_MAX_MESSAGE_BYTES": "1048576",
        "MAILBOT_LOG_LEVEL": "debug",
    })
    assert settings.db_url == "postgresql://mailbot@db.example/mailbot"
    assert (settings.imap_host, settings.imap_user, settings.imap_tls) == ("imap.example", "inquiries", "starttls")
    assert settings.imap_port == 143  # the port follows the TLS mode unless given
    assert settings.smtp_listen == ("::1", 25)
    assert settings.lmtp_listen == ("0.0.0.0", 24)
    assert settings.worker_seconds == 0.5
    assert settings.workers == 3
    assert settings.smtp_connections == 2
    assert settings.max_message_bytes == 1048576
    assert settings.log_level == "DEBUG"


def test_an_empty_listen_address_turns_the_listener_off():
    assert load_settings({"MAILBOT_SMTP_LISTEN": ""}).smtp_listen is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAILBOT_IMAP_PORT", "imap", "MAILBOT_IMAP_PORT has value 'imap'. Not a valid int."),
        ("MAILBOT_IMAP_PORT", "0", "MAILBOT_IMAP_PORT has value '0'. Must be at least 1."),
        ("MAILBOT_SMTP_PORT", "25x", "MAILBOT_SMTP_PORT has value '25x'. Not a valid int."),
        ("MAILBOT_IMAP_BATCH", "0", "MAILBOT_IMAP_BATCH has value '0'. Must be at least 1."),
        ("MAILBOT_MAX_MESSAGE_BYTES", "40MB", "MAILBOT_MAX_MESSAGE_BYTES has value '40MB'. Not a valid int."),
        ("MAILBOT_MAX_MESSAGE_BYTES", "100", "MAILBOT_MAX_MESSAGE_BYTES has value '100'. Must be at least 1024."),
        ("MAILBOT_WORKERS", "0", "MAILBOT_WORKERS has value '0'. Must be at least 1."),
        ("MAILBOT_SMTP_CONNECTIONS", "0", "MAILBOT_SMTP_CONNECTIONS has value '0'. Must be at least 1."),
        ("MAILBOT_WORKERS", "two", "MAILBOT_WORKERS has value 'two'. Not a valid int."),
        ("MAILBOT_WORKER_SECONDS", "often", "MAILBOT_WORKER_SECONDS has value 'often'. Not a valid number."),
        ("MAILBOT_WORKER_SECONDS", "0", "MAILBOT_WORKER_SECONDS has value '0'. Must be greater than 0."),
        ("MAILBOT_OUTBOX_SECONDS", "-1", "MAILBOT_OUTBOX_SECONDS has value '-1'. Must be greater than 0."),
        ("MAILBOT_NOTIFY_SECONDS", "x", "MAILBOT_NOTIFY_SECONDS has value 'x'. Not a valid number."),
        ("MAILBOT_RULES_RELOAD_SECONDS", "0", "MAILBOT_RULES_RELOAD_SECONDS has value '0'. Must be greater than 0."),
        ("MAILBOT_IMAP_POLL_SECONDS", "soon", "MAILBOT_IMAP_POLL_SECONDS has value 'soon'. Not a valid number."),
        ("MAILBOT_IMAP_IDLE_SECONDS", "0", "MAILBOT_IMAP_IDLE_SECONDS has value '0'. Must be greater than 0."),
        ("MAILBOT_IMAP_TLS", "tls", "MAILBOT_IMAP_TLS has value 'tls'. Expected one of: ssl, starttls, none."),
        ("MAILBOT_SMTP_TLS", "yes", "MAILBOT_SMTP_TLS has value 'yes'. Expected one of: ssl, starttls, none."),
        ("MAILBOT_SMTP_LISTEN", "2525",
         "MAILBOT_SMTP_LISTEN has value '2525'. Expected host:port, e.g. 127.0.0.1:2525."),
        ("MAILBOT_LMTP_LISTEN", "localhost:lmtp",
         "MAILBOT_LMTP_LISTEN has value 'localhost:lmtp'. Expected host:port, e.g. 127.0.0.1:2525."),
        ("MAILBOT_LMTP_LISTEN", "localhost:70000",
         "MAILBOT_LMTP_LISTEN has value 'localhost:70000'. Expected host:port, e.g. 127.0.0.1:2525."),
        ("MAILBOT_DB", "mailbot.db",
         "MAILBOT_DB has value 'mailbot.db'. Expected an SQLAlchemy URL such as "
         "sqlite:///mailbot.db or postgresql://user@host/db."),
        ("MAILBOT_LOG_LEVEL", "loud", "MAILBOT_LOG_LEVEL has value 'LOUD'. Expected DEBUG, INFO, WARNING or ERROR."),
        ("MAILBOT_IMAP_HOST", "imap.example", "MAILBOT_IMAP_USER is not set. IMAP intake needs an account."),
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str, message: str):
    with pytest.raises(SettingsError) as error:
        load_settings({name: value})
    assert str(error.value) == message


def test_folders_must_exist(empty_folder: Path):
    missing = empty_folder / "missing"
    for name in ("MAILBOT_RULES", "MAILBOT_TEMPLATES"):
        with pytest.raises(SettingsError) as error:
            load_settings({name: str(missing)})
        assert str(error.value) == f"{name} has value {str(missing)!r}. Not a folder."


def test_env_file_gives_defaults_and_the_environment_wins(empty_folder: Path):
    (empty_folder / ".env").write_text(
        "# mailbot on the test host\n"
        "\n"
        "MAILBOT_DB=sqlite:///from-file.db\n"
        "export MAILBOT_WORKER_SECONDS=5\n"
        "MAILBOT_IMAP_HOST='imap.example'\n"
        'MAILBOT_IMAP_USER="inquiries"\n'
        "MAILBOT_IMAP_PASSWORD = file-sekret\n",
        encoding="utf-8",
    )
    settings = load_settings({"MAILBOT_WORKER_SECONDS": "0.25"})
    assert settings.db_url == "sqlite:///from-file.db"
    assert settings.worker_seconds == 0.25
    assert (settings.imap_host, settings.imap_user, settings.imap_password) == (
        "imap.example", "inquiries", "file-sekret"
    )


def test_env_file_named_by_mailbot_env_file(empty_folder: Path):
    named = empty_folder / "office.env"
    named.write_text("MAILBOT_SMTP_LISTEN=127.0.0.1:2626\n", encoding="utf-8")
    assert load_settings({"MAILBOT_ENV_FILE": str(named)}).smtp_listen == ("127.0.0.1", 2626)
    with pytest.raises(SettingsError) as error:
        load_settings({"MAILBOT_ENV_FILE": str(empty_folder / "nope.env")})
    assert str(error.value) == f"MAILBOT_ENV_FILE has value {str(empty_folder / 'nope.env')!r}. No such file."


def test_a_bad_value_in_the_env_file_also_names_the_variable(empty_folder: Path):
    (empty_folder / ".env").write_text("MAILBOT_IMAP_PORT=imap\n", encoding="utf-8")
    with pytest.raises(SettingsError) as error:
        load_settings({})
    assert str(error.value) == "MAILBOT_IMAP_PORT has value 'imap'. Not a valid int."


def test_a_malformed_env_file_line_names_file_and_line(empty_folder: Path):
    (empty_folder / ".env").write_text("MAILBOT_DB=sqlite:///x.db\nMAILBOT_WORKER_SECONDS\n", encoding="utf-8")
    with pytest.raises(SettingsError) as error:
        load_settings({})
    assert str(error.value) == ".env:2: expected KEY=value, got 'MAILBOT_WORKER_SECONDS'"


def test_passwords_never_appear_in_repr():
    settings = load_settings({
        "MAILBOT_IMAP_HOST": "imap.example",
        "MAILBOT_IMAP_USER": "inquiries",
        "MAILBOT_IMAP_PASSWORD": "imap-sekret-كلمة",
        "MAILBOT_SMTP_PASSWORD": "smtp-sekret",
    })
    assert settings.imap_password == "imap-sekret-كلمة"
    for shown in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert "sekret" not in shown
    assert "imap_password='***'" in repr(settings)
    assert "smtp_password='***'" in repr(settings)
    assert "imap_user='inquiries'" in repr(settings)
    assert "smtp_password=None" in repr(load_settings({}))


def test_a_misspelt_variable_is_named_with_the_nearest_known_one(empty_folder: Path):
    (empty_folder / ".env").write_text("MAILBOT_WORKER=2\n")
    settings = load_settings({"MAILBOT_SMPT_HOST": "relay.example", "MAILBOT_FROBNICATE": "1",
                              "MAILBOT_SMTP_PORT": "2525", "MAILBOT_TEST_PG": "postgresql://x/y", "HOME": "/root"})
    assert settings.warnings == (
        "MAILBOT_FROBNICATE: unknown",
        "MAILBOT_SMPT_HOST: unknown; did you mean MAILBOT_SMTP_HOST?",
        "MAILBOT_WORKER: unknown; did you mean MAILBOT_WORKERS?",
    )
    assert settings.smtp_host is None and settings.workers == 1  # a misspelling sets nothing


def test_known_variables_give_no_warning():
    assert load_settings({"MAILBOT_SMTP_HOST": "relay.example", "MAILBOT_LOG_FORMAT": "json"}).warnings == ()


def test_the_log_format_is_text_or_json():
    assert load_settings({"MAILBOT_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(SettingsError, match=r"MAILBOT_LOG_FORMAT has value 'xml'\. Expected one of: text, json\."):
        load_settings({"MAILBOT_LOG_FORMAT": "xml"})
