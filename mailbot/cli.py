"""Commands: parse arguments, call one function, print, exit with a code.

Only this module exits.  Library errors (SettingsError, RulesError, ...) are
turned into one clear line on stderr and exit code 2.

Each command imports what it needs when it runs: `mailbot run` starts its
workers' fork server before the heavy imports (SQLAlchemy, the pipeline), so
that the two import side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mailbot.settings import Settings, SettingsError, load_settings


def _settings(*, warn: bool = True) -> Settings:
    """The settings; with ``warn``, each unknown MAILBOT_* variable is named on stderr
    (the daemon logs them instead)."""
    try:
        settings = load_settings()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    if warn:
        for warning in settings.warnings:
            click.echo(f"Warning: {warning}", err=True)
    return settings


def _engine(settings: Settings, *, create: bool = False):  # noqa: ANN202
    """The engine; a clear error when the database is unreachable or not ready.

    Only ``create`` (the commands that put data in: ``db upgrade``, ``transactions import``)
    creates or migrates the database; every other command reads the schema's revision and
    refuses when it is not this mailbot's, so it never creates an empty file by mistake nor
    runs a migration beside a daemon that is running one.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from mailbot import db

    try:
        if create:
            db.upgrade(settings.db_url)
        else:
            problem = db.schema_problem(settings.db_url)
            if problem is not None:
                raise click.ClickException(problem)
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
    """Health: the daemons serving this database, messages, processing backlog, queues, outbox,
    intake, the relay and the rules in force.

    Exits 1 when the database cannot be reached, no daemon runs against it, stored mail waits
    unprocessed, outgoing mail is stuck, or IMAP intake or the relay keeps failing."""
    from sqlalchemy.exc import SQLAlchemyError

    from mailbot import db, health, queue, rules_in_force, store

    settings = _settings()
    try:
        engine = db.get_engine(settings.db_url)
        if db.missing_sqlite_file(settings.db_url) is None:
            db.ping(engine)
        problem = db.schema_problem(settings.db_url)
        if problem is not None:
            if as_json:
                click.echo(json.dumps({"database": "not ready", "error": problem}))
            else:
                click.echo(f"database: not ready ({problem})", err=True)
            sys.exit(1)
        now = db.utcnow()
        daemons = health.daemons(engine)
        alive = [daemon for daemon in daemons if daemon.is_alive(now)]
        report: dict[str, Any] = {
            "database": "ok",
            "daemons": [{"id": daemon.id, "version": daemon.version, "started_at": daemon.started_at.isoformat(),
                         "heartbeat_at": daemon.heartbeat_at.isoformat()} for daemon in alive],
            "messages": store.count_by_state(engine),
        }
        queues = queue.queue_health(engine, now)
        report["queues"] = {"open": queues.open_by_department, "overdue": queues.overdue_by_department}
        report["outbox"] = {**queues.outbox, "stuck": queues.outbox_stuck}
        backlog = store.processing_backlog(engine, now)
        report["processing"] = {
            "waiting": backlog.waiting,
            "oldest_received_at": backlog.oldest_received_at.isoformat() if backlog.oldest_received_at else None,
            "stuck": backlog.stuck,
        }
        outcomes = store.intake_health(engine)
        report["intake"] = {
            intake.name: {
                "last_ok_at": intake.last_ok_at.isoformat() if intake.last_ok_at else None,
                "last_error_at": intake.last_error_at.isoformat() if intake.last_error_at else None,
                "last_error": intake.last_error,
                "failing": intake.is_failing(now),
            }
            for intake in outcomes
        }
        report["relay"] = report["intake"].pop(health.RELAY, None)
        kept = rules_in_force.saved(engine)
        report["rules"] = None if kept is None else {
            "saved_at": kept.saved_at.isoformat(),
            "refused_at": kept.refused_at.isoformat() if kept.refused_at else None,
            "refused": kept.refused,
        }
    except SQLAlchemyError as error:
        message = f"{error.__class__.__name__}: {str(error).splitlines()[0]}"
        if as_json:
            click.echo(json.dumps({"database": "unreachable", "error": message}))
        else:
            click.echo(f"database: unreachable ({message})", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo("database: ok")
        for daemon in alive:
            click.echo(f"daemon {daemon.id}: mailbot {daemon.version}, running since "
                       f"{daemon.started_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {daemon.heartbeat_at:%H:%M:%S} UTC")
        click.echo("messages:")
        for state, count in report["messages"].items():
            click.echo(f"  {state:<12} {count}")
        click.echo("queues (open / overdue):")
        for department, count in sorted(queues.open_by_department.items()):
            click.echo(f"  {department:<12} {count} / {queues.overdue_by_department.get(department, 0)}")
        click.echo(f"processing: {backlog.waiting} waiting"
                   + (f", oldest received {backlog.oldest_received_at:%Y-%m-%d %H:%M:%S} UTC"
                      if backlog.oldest_received_at else ""))
        click.echo("outbox:")
        for state, count in report["outbox"].items():
            click.echo(f"  {state:<12} {count}")
        for intake in outcomes:
            label = "relay" if intake.name == health.RELAY else f"intake {intake.name}"
            click.echo(f"{label}: last ok {intake.last_ok_at or 'never'}"
                       + (f", last error {intake.last_error_at}: {intake.last_error}" if intake.last_error_at else ""))
        if kept is not None:
            click.echo(f"rules in force: loaded {kept.saved_at:%Y-%m-%d %H:%M:%S} UTC"
                       + (f"; last reload refused {kept.refused_at:%Y-%m-%d %H:%M:%S} UTC: {kept.refused}"
                          if kept.refused_at else ""))
    if not alive:
        last = f" (the last heartbeat, from {daemons[0].id}, was at {daemons[0].heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)" \
            if daemons else ""
        click.echo(f"no daemon: no `mailbot run` is serving this database{last}", err=True)
    failing = [intake for intake in outcomes if intake.is_failing(now)]
    for intake in failing:
        label = "relay" if intake.name == health.RELAY else f"intake {intake.name}"
        click.echo(f"{label} failing: {intake.last_error}", err=True)
    if queues.is_stuck:
        click.echo(f"outbox stuck: {queues.outbox_stuck} mail(s) unsent for over "
                   f"{int(queue.STUCK_AFTER.total_seconds() // 60)} minutes", err=True)
    if backlog.stuck:
        click.echo(f"processing stuck: {backlog.stuck} mail(s) stored over "
                   f"{int(store.PROCESSING_GRACE.total_seconds() // 60)} minutes ago and not processed "
                   "(is `mailbot run` running? its log names a worker that keeps failing)", err=True)
    if not alive or queues.is_stuck or failing or backlog.stuck:
        sys.exit(1)


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    settings = _settings()
    _engine(settings, create=True)
    click.echo("database schema is up to date")


@cli.command()
@click.argument("template")
@click.option("--lang", "language", type=click.Choice(["ar", "en"]), default="ar", show_default=True)
@click.option("--html", "as_html", is_flag=True, help="Print the HTML part instead of the text part.")
def preview(template: str, language: str, as_html: bool) -> None:
    """Render reply TEMPLATE with sample data (subject line, blank line, body)."""
    from mailbot import reply
    from mailbot.rules import RulesError, load_rules

    settings = _settings()
    try:
        rules = load_rules(settings.rules_dir)
        rendered = reply.render(template, language, reply.sample_context(), rules, settings.templates_dir)
    except (RulesError, reply.ReplyError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Subject: {rendered.subject}\n")
    click.echo(rendered.html if as_html else rendered.text, nl=False)


@cli.group("outbox")
def outbox_group() -> None:
    """Outgoing mail: list it, retry what failed."""


@outbox_group.command("list")
@click.option("--state", type=click.Choice(["pending", "sending", "sent", "failed"]), default=None)
@click.option("--limit", type=int, default=100, show_default=True)
def outbox_list(state: str | None, limit: int) -> None:
    """Newest first: id, state, attempts, template, recipient, next attempt, last error."""
    from mailbot import outbox

    engine = _engine(_settings())
    for entry in outbox.list_outbox(engine, state=state, limit=limit):
        due = entry.sent_at if entry.state == "sent" else entry.next_attempt_at
        click.echo(
            f"{entry.id:>6} {entry.state:<8} {entry.attempts:>3} {entry.template:<17} {entry.recipient} "
            f"{due:%Y-%m-%d %H:%M:%S} {entry.last_error or ''}".rstrip()
        )


@outbox_group.command("retry")
@click.argument("outbox_id", required=False, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Every failed mail.")
def outbox_retry(outbox_id: int | None, retry_all: bool) -> None:
    """Put failed mail ID (or --all failed mail) back in the queue, due now."""
    from mailbot import outbox

    if (outbox_id is None) == (not retry_all):
        raise click.UsageError("give an outbox ID or --all (not both)")
    engine = _engine(_settings())
    count = outbox.retry(engine, None if retry_all else [outbox_id])
    if outbox_id is not None and count == 0:
        raise click.ClickException(f"outbox {outbox_id} is not a failed mail")
    click.echo(f"{count} mail(s) queued again")


@cli.command()
@click.option("--role", type=click.Choice(["all", "ingress", "worker", "sender"]), default="all", show_default=True,
              help="ingress: SMTP/LMTP and IMAP intake; worker: the pipeline and the status and escalation "
                   "jobs; sender: the outbox.  Other than all needs PostgreSQL.")
def run(role: str) -> None:
    """Run the daemon: SMTP/LMTP (and IMAP) intake and the worker, until SIGTERM or Ctrl-C."""
    from mailbot import workers

    workers.start_fork_server()  # first: its imports run beside the ones below
    from sqlalchemy.exc import SQLAlchemyError

    from mailbot import jobs
    from mailbot.logs import setup_logging
    from mailbot.rules import RulesError

    settings = _settings(warn=False)
    setup_logging(settings.log_level, settings.log_format)
    from mailbot.db import DatabaseInUse

    try:
        jobs.run_daemon(settings, role=role)
    except (DatabaseInUse, jobs.RoleError) as error:
        raise click.ClickException(str(error)) from None
    except RulesError as error:
        raise click.ClickException(str(error)) from None
    except SQLAlchemyError as error:
        first_line = str(error).splitlines()[0]
        raise click.ClickException(f"database cannot be used: {error.__class__.__name__}: {first_line}") from None
    except OSError as error:
        raise click.ClickException(f"cannot listen: {error}") from None


@cli.group("quarantine")
def quarantine_group() -> None:
    """Mail the pipeline could not handle: list, show, retry."""


@quarantine_group.command("list")
def quarantine_list() -> None:
    """Oldest first: id, received, Message-ID, first line of the reason."""
    from mailbot import pipeline

    engine = _engine(_settings())
    for mail in pipeline.list_quarantined(engine):
        click.echo(f"{mail.id:>6} {mail.received_at:%Y-%m-%d %H:%M:%S} {mail.message_id or '-'} {mail.reason_line}")


@quarantine_group.command("show")
@click.argument("message_id", metavar="ID", type=int)
def quarantine_show(message_id: int) -> None:
    """Headers, size and origin of quarantined mail ID, and the full reason."""
    from mailbot import pipeline

    engine = _engine(_settings())
    mail = pipeline.find_quarantined(engine, message_id)
    if mail is None:
        raise click.ClickException(f"mail {message_id} is not in quarantine")
    click.echo(f"mail:     {mail.id}")
    click.echo(f"received: {mail.received_at:%Y-%m-%d %H:%M:%S} UTC via {mail.origin}")
    click.echo(f"size:     {mail.size} bytes")
    click.echo(f"attempts: {mail.attempts}")
    for name, value in mail.headers:
        click.echo(f"{name + ':':<12}{value}")
    click.echo("reason:")
    click.echo(mail.reason)


@quarantine_group.command("retry")
@click.argument("message_id", metavar="ID", required=False, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Every quarantined mail.")
def quarantine_retry(message_id: int | None, retry_all: bool) -> None:
    """Put quarantined mail ID (or --all) back in the queue for the worker."""
    from mailbot import pipeline

    if (message_id is None) == (not retry_all):
        raise click.UsageError("give a mail ID or --all (not both)")
    engine = _engine(_settings())
    released = pipeline.retry_quarantined(engine, None if retry_all else [message_id])
    if message_id is not None and not released:
        raise click.ClickException(f"mail {message_id} is not in quarantine")
    click.echo(f"{len(released)} mail(s) queued again")


def _rules():  # noqa: ANN202 - Rules, imported lazily
    """The rules on disk; while they are refused (an admin mid-edit), the rules in force that the
    daemon kept in the database, with a warning on stderr that says why the files are refused."""
    from sqlalchemy.exc import SQLAlchemyError

    from mailbot import db, rules_in_force
    from mailbot.rules import RulesError, load_rules

    settings = _settings()
    try:
        return load_rules(settings.rules_dir)
    except RulesError as error:
        refused = error
    try:
        kept = None if db.schema_problem(settings.db_url) else rules_in_force.saved(db.get_engine(settings.db_url))
    except SQLAlchemyError:
        kept = None
    if kept is None:
        raise click.ClickException(str(refused)) from None
    click.echo(f"warning: {refused}\nwarning: using the rules in force, as the daemon loaded them at "
               f"{kept.saved_at:%Y-%m-%d %H:%M:%S} UTC", err=True)
    return kept.rules()


@cli.group("rules")
def rules_group() -> None:
    """Check the rules YAML and see why a mail goes where it goes."""


@rules_group.command("check")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False))
def rules_check(folder: str | None) -> None:
    """Validate FOLDER (default: MAILBOT_RULES); print every mistake as file:line:col and exit 1."""
    from mailbot.rules import RulesError, load_rules

    folder = folder or str(_settings().rules_dir)
    try:
        rules = load_rules(folder)
    except RulesError as error:
        for line in error.errors:
            click.echo(line, err=True)
        click.echo(f"{len(error.errors)} error(s) in {folder}", err=True)
        sys.exit(1)
    click.echo(f"ok: {folder}: {len(rules.departments)} departments, {len(rules.statuses)} statuses, "
               f"{len(rules.routing)} routing rules, "
               f"{sum(len(d.keywords.ar) + len(d.keywords.en) for d in rules.departments)} keywords")


@rules_group.command("explain")
@click.argument("eml", type=click.Path(exists=True, dir_okay=False))
def rules_explain(eml: str) -> None:
    """Each routing rule tried on EML and why it matched or not; the decision and the disclosure."""
    from pathlib import Path

    from mailbot.disclose import disclosed, is_sender_verified, reply_template
    from mailbot.parse import ParseError, parse_mail
    from mailbot.route import route
    from mailbot.triage import read_only_lookup
    from mailbot.understand import understand

    rules = _rules()
    try:
        understanding = understand(parse_mail(Path(eml).read_bytes()), rules)
    except ParseError as error:
        raise click.ClickException(f"{eml}: {error}") from None
    lookup, _ = read_only_lookup(_settings().db_url)  # explaining must not create or change a database
    known = lookup(understanding.numbers)
    decision = route(understanding, rules, known)
    click.echo(f"kind: {understanding.kind} ({understanding.kind_reason})")
    click.echo(f"language: {understanding.language}")
    for found in understanding.transactions:
        record = known.get(found.number)
        on_file = f"on file: {record.department}, {record.status}" if record else "not on file"
        click.echo(f"transaction: {found.number} in {found.where} ({on_file})")
    click.echo("rules tried:")
    for rule_id, matched, why in decision.tried:
        click.echo(f"  {'MATCH' if matched else 'no   '} {rule_id}: {why}")
    click.echo(f"decision: department={decision.department} rule={decision.rule} priority={decision.priority}"
               + (f" tag={decision.tag}" if decision.tag else "") + (" no_auto_reply" if decision.no_auto_reply else ""))
    shown = disclosed(understanding, rules, known)
    verified, why = is_sender_verified(understanding.mail.sender, understanding.mail.auth_results, rules)
    click.echo(f"sender {understanding.mail.sender}: {'verified' if verified else 'NOT verified'} ({why})")
    click.echo(f"disclosed: {', '.join(shown) or '-'}")
    click.echo(f"reply: {reply_template(understanding, decision, shown)}")


@cli.group("transactions")
def transactions_group() -> None:
    """Back-office transaction records."""


@transactions_group.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--skip-bad", is_flag=True, help="Import the good lines even when some are bad.")
def transactions_import(csv_file: str, skip_bad: bool) -> None:
    """Upsert records from CSV_FILE (number,department,status,applicant_email,applicant_name,updated_at)."""
    from pathlib import Path

    from mailbot.transactions import import_csv

    rules = _rules()
    engine = _engine(_settings(), create=True)  # the back-office's first import may make the database
    if sys.stderr.isatty():
        with open(csv_file, "rb") as handle:
            lines = max(sum(1 for _ in handle) - 1, 0)
        with click.progressbar(length=lines, label="importing", file=sys.stderr) as bar:
            report = import_csv(engine, Path(csv_file), rules, skip_bad, progress=bar.update)
    else:
        report = import_csv(engine, Path(csv_file), rules, skip_bad)
    for error in report.errors:
        click.echo(f"{csv_file}: {error}", err=True)
    if not report.applied:
        click.echo(f"{report.bad_lines} bad line(s) ({report.encoding}): nothing imported "
                   "(fix them, or use --skip-bad)", err=True)
        sys.exit(1)
    click.echo(f"imported {csv_file} ({report.encoding}): {report.created} new, {report.updated} updated, {report.unchanged} unchanged, "
               f"{report.status_changes} status change(s), {report.bad_lines} bad line(s) skipped")


@transactions_group.command("set-status")
@click.argument("number")
@click.argument("status")
@click.option("--note", help="Why, kept in the history.")
def transactions_set_status(number: str, status: str, note: str | None) -> None:
    """Set NUMBER's status to STATUS (recorded in its history, source cli); say who is told, and when.

    A --note goes into the citizens' status mail."""
    from mailbot import db
    from mailbot.transactions import TransactionError, set_status

    from mailbot import health, notify
    from mailbot.transactions import canonical_number

    rules = _rules()
    settings = _settings()
    engine = _engine(settings)
    try:
        previous = set_status(engine, number, status, rules, note)
    except TransactionError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{number}: {previous} -> {status}")
    told = notify.to_be_told(engine, canonical_number(number, rules) or number, rules)
    if not told:
        click.echo("no citizen is subscribed to it on the record: nobody is told")
        return
    now = db.utcnow()
    when = (f"within {settings.notify_seconds:g} s, at the daemon's next status run"
            if any(daemon.is_alive(now) for daemon in health.daemons(engine))
            else "when `mailbot run` starts (no daemon is running now)")
    click.echo(f"{len(told)} citizen(s) will be told {when}" + (", with the note" if note else "")
               + f": {', '.join(told)}")


@transactions_group.command("show")
@click.argument("number")
def transactions_show(number: str) -> None:
    """NUMBER's record and status history."""
    from mailbot import workhours
    from mailbot.transactions import TransactionError, show

    rules = _rules()
    try:
        record, history = show(_engine(_settings()), number, rules)
    except TransactionError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"number: {record.number}")
    click.echo(f"department: {record.department}")
    click.echo(f"status: {record.status} ({rules.status_label(record.status, 'ar')} / {rules.status_label(record.status, 'en')})")
    click.echo(f"applicant: {record.applicant_name or '-'} <{', '.join(record.applicant_emails.split()) or '-'}>")
    click.echo(f"updated: {workhours.stamp(record.updated_at, rules)}")
    click.echo("history:")
    for entry in history:
        note = f" — {entry.note}" if entry.note else ""
        click.echo(f"  {workhours.stamp(entry.changed_at, rules)} {entry.previous_status or '-'} -> {entry.status} ({entry.source}){note}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per mail (the machine-readable contract).")
def triage(paths: tuple[Path, ...], as_json: bool) -> None:
    """What the service would do with each mail file (or each file in a directory), without side effects.

    A file that cannot be read or parsed gets a line with kind null and the reason.
    """
    from mailbot import triage as triage_stage

    rules = _rules()
    lookup, engine = triage_stage.read_only_lookup(_settings().db_url)
    try:
        for result in triage_stage.triage_paths(paths, rules, lookup):
            if as_json:
                click.echo(json.dumps(result.as_json(), ensure_ascii=False))
            else:
                click.echo(triage_stage.explain(result))
    finally:
        if engine is not None:
            engine.dispose()


@cli.group("queue")
def queue_group() -> None:
    """Department queues: list, show, claim, reply, close, assign."""


def _inquiry_ref(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    import re

    match = re.fullmatch(r"\[?(?:INQ-)?0*(\d{1,9})\]?", value.strip(), re.IGNORECASE)
    if match is None:
        raise click.BadParameter(f"{value!r} is not an inquiry reference (e.g. INQ-000123 or 123)")
    return int(match.group(1))


def _queue_do(action) -> None:  # noqa: ANN001 - callable(session, rules, now)
    """Run one queue action in one transaction; a refusal is one line on stderr, exit 1."""
    from mailbot import db, queue, reply

    settings = _settings()
    rules = _rules()
    engine = _engine(settings)
    try:
        with db.session(engine) as session:
            action(session, rules, db.utcnow(), settings)
    except (queue.QueueError, reply.ReplyError) as error:
        raise click.ClickException(str(error)) from None


@queue_group.command("list")
@click.option("--department", default=None, help="Only this department's queue.")
@click.option("--overdue", is_flag=True, help="Only inquiries past their SLA.")
def queue_list(department: str | None, overdue: bool) -> None:
    """Inquiries not closed, overdue first, then oldest first: age and SLA left."""
    from mailbot import queue

    def action(session, rules, now, _settings) -> None:  # noqa: ANN001
        known = [d.id for d in rules.departments]
        if department and department not in known:
            raise queue.QueueError(f"unknown department '{department}' (expected one of: {', '.join(known)})")
        items = queue.list_queue(session, now, department=department, overdue=overdue)
        for item in items:
            click.echo(queue.format_item(item))
        click.echo(f"{len(items)} inquiries", err=True)

    _queue_do(action)


@queue_group.command("show")
@click.argument("inquiry", metavar="INQ", callback=_inquiry_ref)
def queue_show(inquiry: int) -> None:
    """The inquiry and its whole thread."""
    from mailbot import queue

    _queue_do(lambda session, rules, now, _s: click.echo("\n".join(queue.format_view(
        queue.show_inquiry(session, inquiry, now), rules))))


@queue_group.command("claim")
@click.argument("inquiry", metavar="INQ", callback=_inquiry_ref)
@click.option("--clerk", required=True, help="The clerk's address (one of the department's clerks).")
def queue_claim(inquiry: int, clerk: str) -> None:
    """Take INQ: you answer it."""
    from mailbot import queue

    _queue_do(lambda session, rules, now, _s: queue.claim(session, inquiry, clerk, rules, now))
    click.echo(f"{queue.reference(inquiry)} claimed by {clerk}")


@queue_group.command("reply")
@click.argument("inquiry", metavar="INQ", callback=_inquiry_ref)
@click.option("--clerk", required=True, help="The clerk's address (one of the department's clerks).")
@click.option("--text", default=None, help="The answer; read from stdin when omitted.")
def queue_reply(inquiry: int, clerk: str, text: str | None) -> None:
    """Send an answer to the citizen under the office's name (as an emailed answer would be)."""
    from mailbot import queue

    answer = text if text is not None else sys.stdin.read()
    _queue_do(lambda session, rules, now, settings: queue.reply_from_terminal(
        session, inquiry, clerk, answer, rules, now, templates_dir=settings.templates_dir))
    click.echo(f"answer to {queue.reference(inquiry)} queued for sending")


@queue_group.command("close")
@click.argument("inquiry", metavar="INQ", callback=_inquiry_ref)
def queue_close(inquiry: int) -> None:
    """Close INQ: it leaves the queue."""
    from mailbot import queue

    _queue_do(lambda session, _rules, now, _s: queue.close(session, inquiry, now, author="cli"))
    click.echo(f"{queue.reference(inquiry)} closed")


@queue_group.command("assign")
@click.argument("inquiry", metavar="INQ", callback=_inquiry_ref)
@click.argument("department")
def queue_assign(inquiry: int, department: str) -> None:
    """Move INQ to DEPARTMENT's queue and forward it there."""
    from mailbot import queue

    _queue_do(lambda session, rules, now, settings: queue.assign(
        session, inquiry, department, rules, now, author="cli", templates_dir=settings.templates_dir))
    click.echo(f"{queue.reference(inquiry)} assigned to {department}")


def main() -> None:
    cli(prog_name="mailbot")
