"""Settings from the environment, with an optional ``.env`` file for defaults.

The environment always wins over the file, so an operator can override one
value for one run without editing anything.  Every value is validated here, at
start, and a bad one raises :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shipped(name: str) -> Path:
    """A folder shipped with mailbot: in a checkout (or editable install) the
    source tree's, after ``pip install .`` the copy under ``<prefix>/share/mailbot``."""
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        return PROJECT_ROOT / name
    return Path(sys.prefix) / "share" / "mailbot" / name


SHIPPED_RULES = shipped("rules")
SHIPPED_TEMPLATES = shipped("templates")
TLS_MODES = ("ssl", "starttls", "none")
LOG_FORMATS = ("text", "json")
# Read by mailbot itself but not a setting of the daemon, or not mailbot's at all.
_NOT_SETTINGS = ("MAILBOT_ENV_FILE", "MAILBOT_TEST_", "MAILBOT_SECRET")  # the secret: read by verp.py alone


class SettingsError(ValueError):
    """A setting has a value mailbot cannot use."""


@dataclass(frozen=True)
class Settings:
    db_url: str = "sqlite:///mailbot.db"
    rules_dir: Path = SHIPPED_RULES
    templates_dir: Path = SHIPPED_TEMPLATES
    imap_host: str | None = None
    imap_port: int = 993
    imap_user: str | None = None
    imap_password: str | None = None
    imap_tls: str = "ssl"
    imap_folder: str = "INBOX"
    imap_processed_folder: str = "Processed"
    imap_poll_seconds: float = 30.0
    imap_idle_seconds: float = 300.0
    imap_batch: int = 50
    smtp_listen: tuple[str, int] | None = ("127.0.0.1", 2525)
    lmtp_listen: tuple[str, int] | None = None
    max_message_bytes: int = 40 * 1024 * 1024
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_tls: str = "starttls"
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_connections: int = 4
    sent_maildir: Path = Path("sent")
    workers: int = 1
    worker_seconds: float = 1.0
    outbox_seconds: float = 2.0
    notify_seconds: float = 30.0
    rules_reload_seconds: float = 2.0
    log_level: str = "INFO"
    log_format: str = "text"
    # "MAILBOT_SMPT_HOST: unknown; did you mean MAILBOT_SMTP_HOST?", one per unknown variable.
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print passwords into logs or tracebacks
        hidden = {"imap_password", "smtp_password"}
        fields = ", ".join(
            f"{name}={'***' if name in hidden and value else value!r}"
            for name, value in self.__dict__.items()
        )
        return f"Settings({fields})"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines; ``#`` comments and blank lines are skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(f"{path}:{number}: expected KEY=value, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class _Recording(dict[str, str]):
    """The merged environment, noting every name load_settings asks for: what it never asks
    for is not a setting, however close its spelling."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)


def _unknown(env: _Recording) -> tuple[str, ...]:
    # Compared without the common prefix, which would make every name look alike.
    known = {name.removeprefix("MAILBOT_"): name for name in env.asked}
    warnings = []
    for name in sorted(env):
        if not name.startswith("MAILBOT_") or name in env.asked or name.startswith(_NOT_SETTINGS):
            continue
        near = difflib.get_close_matches(name.removeprefix("MAILBOT_"), sorted(known), n=1, cutoff=0.7)
        warnings.append(f"{name}: unknown" + (f"; did you mean {known[near[0]]}?" if near else ""))
    return tuple(warnings)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} has value {raw!r}. Not a valid int.") from None
    if value < minimum:
        raise SettingsError(f"{name} has value {raw!r}. Must be at least {minimum}.")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} has value {raw!r}. Not a valid number.") from None
    if value <= 0:
        raise SettingsError(f"{name} has value {raw!r}. Must be greater than 0.")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "") or default
    if raw.lower() not in choices:
        raise SettingsError(f"{name} has value {raw!r}. Expected one of: {', '.join(choices)}.")
    return raw.lower()


def _address(env: Mapping[str, str], name: str, default: str) -> tuple[str, int] | None:
    raw = env.get(name, default).strip()
    if not raw:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{name} has value {raw!r}. Expected host:port, e.g. 127.0.0.1:2525.")
    return host.strip("[]"), int(port)


def _text(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name) or None


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default ``os.environ``).

    ``env_file`` (default ``$MAILBOT_ENV_FILE`` or ``./.env`` when present)
    supplies defaults for variables the environment does not set.
    """
    environ = dict(os.environ if environ is None else environ)
    if env_file is None:
        named = environ.get("MAILBOT_ENV_FILE")
        env_file = Path(named) if named else Path(".env")
        if not named and not env_file.is_file():
            env_file = None
    merged: dict[str, str] = {}
    if env_file is not None:
        if not env_file.is_file():
            raise SettingsError(f"MAILBOT_ENV_FILE has value {str(env_file)!r}. No such file.")
        merged.update(read_env_file(env_file))
    merged.update(environ)
    env = _Recording(merged)

    db_url = env.get("MAILBOT_DB") or Settings.db_url
    if "://" not in db_url:
        raise SettingsError(
            f"MAILBOT_DB has value {db_url!r}. Expected an SQLAlchemy URL such as "
            "sqlite:///mailbot.db or postgresql://user@host/db."
        )
    rules_dir = Path(env.get("MAILBOT_RULES") or SHIPPED_RULES)
    if not rules_dir.is_dir():
        raise SettingsError(f"MAILBOT_RULES has value {str(rules_dir)!r}. Not a folder.")
    templates_dir = Path(env.get("MAILBOT_TEMPLATES") or SHIPPED_TEMPLATES)
    if not templates_dir.is_dir():
        raise SettingsError(f"MAILBOT_TEMPLATES has value {str(templates_dir)!r}. Not a folder.")

    imap_tls = _choice(env, "MAILBOT_IMAP_TLS", "ssl", TLS_MODES)
    imap_host = _text(env, "MAILBOT_IMAP_HOST")
    if imap_host and not env.get("MAILBOT_IMAP_USER"):
        raise SettingsError("MAILBOT_IMAP_USER is not set. IMAP intake needs an account.")
    smtp_tls = _choice(env, "MAILBOT_SMTP_TLS", "starttls", TLS_MODES)
    log_level = (env.get("MAILBOT_LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"MAILBOT_LOG_LEVEL has value {log_level!r}. Expected DEBUG, INFO, WARNING or ERROR.")
    log_format = _choice(env, "MAILBOT_LOG_FORMAT", "text", LOG_FORMATS)

    settings = Settings(
        db_url=db_url,
        rules_dir=rules_dir,
        templates_dir=templates_dir,
        imap_host=imap_host,
        imap_port=_int(env, "MAILBOT_IMAP_PORT", 993 if imap_tls == "ssl" else 143, minimum=1),
        imap_user=_text(env, "MAILBOT_IMAP_USER"),
        imap_password=_text(env, "MAILBOT_IMAP_PASSWORD"),
        imap_tls=imap_tls,
        imap_folder=env.get("MAILBOT_IMAP_FOLDER") or "INBOX",
        imap_processed_folder=env.get("MAILBOT_IMAP_PROCESSED_FOLDER") or "Processed",
        imap_poll_seconds=_float(env, "MAILBOT_IMAP_POLL_SECONDS", 30.0),
        imap_idle_seconds=_float(env, "MAILBOT_IMAP_IDLE_SECONDS", 300.0),
        imap_batch=_int(env, "MAILBOT_IMAP_BATCH", 50, minimum=1),
        smtp_listen=_address(env, "MAILBOT_SMTP_LISTEN", "127.0.0.1:2525"),
        lmtp_listen=_address(env, "MAILBOT_LMTP_LISTEN", ""),
        max_message_bytes=_int(env, "MAILBOT_MAX_MESSAGE_BYTES", 40 * 1024 * 1024, minimum=1024),
        smtp_host=_text(env, "MAILBOT_SMTP_HOST"),
        smtp_port=_int(env, "MAILBOT_SMTP_PORT", 465 if smtp_tls == "ssl" else 587, minimum=1),
        smtp_tls=smtp_tls,
        smtp_user=_text(env, "MAILBOT_SMTP_USER"),
        smtp_password=_text(env, "MAILBOT_SMTP_PASSWORD"),
        smtp_connections=_int(env, "MAILBOT_SMTP_CONNECTIONS", 4, minimum=1),
        sent_maildir=Path(env.get("MAILBOT_SENT_MAILDIR") or "sent"),
        workers=_int(env, "MAILBOT_WORKERS", 1, minimum=1),
        worker_seconds=_float(env, "MAILBOT_WORKER_SECONDS", 1.0),
        outbox_seconds=_float(env, "MAILBOT_OUTBOX_SECONDS", 2.0),
        notify_seconds=_float(env, "MAILBOT_NOTIFY_SECONDS", 30.0),
        rules_reload_seconds=_float(env, "MAILBOT_RULES_RELOAD_SECONDS", 2.0),
        log_level=log_level,
        log_format=log_format,
    )
    # Every setting has been read above: what is left over is unknown.
    return replace(settings, warnings=_unknown(env))
