"""Commands: parse arguments, call one function, print, exit with a code.

Only this module exits.  Library errors (SettingsError, RulesError, ...) are
turned into one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click
from sqlalchemy.exc import SQLAlchemyError

from mailbot import db, store
from mailbot.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None


def _engine(settings: Settings):  # noqa: ANN202
    """The engine, migrated to the newest schema; a clear error when unreachable."""
    try:
        db.upgrade(settings.db_url)
        return db.get_engine(settings.db_url)
    except SQLAlchemyError as error:
        raise click.ClickException(f"database {settings.db_url!r} cannot be used: {error.__class__.__name__}: {error.args[0] if error.args else error}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mailbot")
def cli() -> None:
    """mailbot — your email acts for you.

    Settings come from MAILBOT_* environment variables (see README).
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def status(as_json: bool) -> None:
    """Health: messages per processing state. Exits 1 when the database cannot be reached."""
    settings = _settings()
    try:
        engine = db.get_engine(settings.db_url)
        db.ping(engine)
        db.upgrade(settings.db_url)
        report = {"database": "ok", "messages": store.count_by_state(engine)}
    except SQLAlchemyError as error:
        message = f"{error.__class__.__name__}: {str(error).splitlines()[0]}"
        if as_json:
            click.echo(json.dumps({"database": "unreachable", "error": message}))
        else:
            click.echo(f"database: unreachable ({message})", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    click.echo("database: ok")
    click.echo("messages:")
    for state, count in report["messages"].items():
        click.echo(f"  {state:<12} {count}")


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    settings = _settings()
    _engine(settings)
    click.echo("database schema is up to date")


def main() -> None:
    cli(prog_name="mailbot")
