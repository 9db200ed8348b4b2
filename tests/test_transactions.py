"""transactions.py and its CLI: CSV import all-or-nothing, history, set-status, show, lookups."""

from __future__ import annotations

import codecs
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select
from sqlalchemy.engine import Engine

from mailbot import db
from mailbot.cli import cli
from mailbot.models import Transaction, TransactionHistory
from mailbot.rules import Rules
from mailbot.transactions import (KnownTransaction, TransactionError, canonical_number, import_csv,
                                  known_transactions, set_status)

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
HEADER = "number,department,status,applicant_email,applicant_name,updated_at\n"
GOOD = (
    "1446/00321,prisons,under_review,Ahmed@Gmail.example,أحمد الغامدي,2025-01-20T10:00:00+03:00\n"
    "١٤٤٦/٠٠٤٠٠,rights,received,a@x.example; B@y.example,سارة,2025-01-21T09:00:00Z\n"
)
BAD = (
    "1446/00321,prisons,under_review,ahmed@gmail.example,أحمد,2025-01-20T10:00:00+03:00\n"  # line 2
    "1446/12,prisons,received,x@y.example,x,2025-01-20T10:00:00+03:00\n"  # line 3: serial too short
    "1446/00500,courts,received,x@y.example,x,2025-01-20T10:00:00+03:00\n"  # line 4
    "1446/00501,prisons,lost,x@y.example,x,2025-01-20T10:00:00+03:00\n"  # line 5
    "1446/00502,prisons,received,not-an-email,x,2025-01-20T10:00:00+03:00\n"  # line 6
    "1446/00503,prisons,received,x@y.example,x,yesterday\n"  # line 7
    "1446/00504,prisons,received,x@y.example\n"  # line 8
    "1446/00505,general,received,x@y.example,\"الاسم, مع فاصلة\",2025-01-20\n"  # line 9: good
    "1446/00321,rights,received,x@y.example,x,2025-01-20T10:00:00+03:00\n"  # line 10: duplicate
)
BAD_ERRORS = [
    "line 3: bad transaction number '1446/12' (expected YYYY/SERIAL, e.g. 1446/00321)",
    "line 4: unknown department 'courts' (expected rights, prisons, criminal, statements, governorates, "
    "completion, general)",
    "line 5: unknown status 'lost' (expected received, under_review, awaiting_documents, forwarded, completed, "
    "rejected)",
    "line 6: bad email 'not-an-email'",
    "line 7: bad date 'yesterday' (expected ISO 8601, e.g. 2025-01-30T10:00:00+03:00)",
    "line 8: expected 6 columns (number,department,status,applicant_email,applicant_name,updated_at), got 4",
    "line 10: transaction 1446/00321 already on line 2",
]


def csv_file(tmp_path: Path, body: str, name: str = "export.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return path


def records(engine: Engine) -> dict[str, tuple]:
    with engine.connect() as connection:
        rows = connection.execute(select(Transaction.__table__)).all()
    return {row.number: (row.department, row.status, row.applicant_emails, row.applicant_name) for row in rows}


def history(engine: Engine, number: str) -> list[tuple]:
    table = TransactionHistory.__table__
    with engine.connect() as connection:
        rows = connection.execute(select(table).where(table.c.number == number).order_by(table.c.id)).all()
    return [(row.previous_status, row.status, row.source, row.note) for row in rows]


def run(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"MAILBOT_DB": db_url})


def test_import_creates_records_and_history(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    report = import_csv(engine, csv_file(tmp_path, GOOD), rules)
    assert (report.applied, report.created, report.updated, report.errors) == (True, 2, 0, [])
    assert records(engine) == {
        "1446/00321": ("prisons", "under_review", "ahmed@gmail.example", "أحمد الغامدي"),
        "1446/00400": ("rights", "received", "a@x.example b@y.example", "سارة"),
    }
    assert history(engine, "1446/00321") == [(None, "under_review", "csv", None)]
    with engine.connect() as connection:
        updated = connection.execute(select(Transaction.__table__.c.updated_at)
                                     .where(Transaction.__table__.c.number == "1446/00321")).scalar_one()
    assert updated == datetime(2025, 1, 20, 7, 0, tzinfo=timezone.utc)


def test_reimport_records_status_changes_only(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    import_csv(engine, csv_file(tmp_path, GOOD), rules)
    changed = GOOD.replace("prisons,under_review", "prisons,completed").replace("سارة", "سارة العتيبي")
    report = import_csv(engine, csv_file(tmp_path, changed, "second.csv"), rules)
    assert (report.created, report.updated, report.unchanged, report.status_changes) == (0, 2, 0, 1)
    assert history(engine, "1446/00321") == [(None, "under_review", "csv", None),
                                             ("under_review", "completed", "csv", None)]
    assert history(engine, "1446/00400") == [(None, "received", "csv", None)]
    report = import_csv(engine, csv_file(tmp_path, changed, "third.csv"), rules)
    assert (report.updated, report.unchanged) == (0, 2)


def test_a_file_with_bad_lines_changes_nothing(db_url: str, engine: Engine, tmp_path: Path) -> None:
    path = csv_file(tmp_path, BAD)
    result = run(db_url, "transactions", "import", str(path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{path}: {error}" for error in BAD_ERRORS] + [
        "7 bad line(s) (UTF-8): nothing imported (fix them, or use --skip-bad)"]
    assert records(engine) == {}


def test_skip_bad_imports_the_good_lines(db_url: str, engine: Engine, tmp_path: Path) -> None:
    path = csv_file(tmp_path, BAD)
    result = run(db_url, "transactions", "import", str(path), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"imported {path} (UTF-8): 2 new, 0 updated, 0 unchanged, 0 status change(s), "
                             "7 bad line(s) skipped\n")
    assert sorted(records(engine)) == ["1446/00321", "1446/00505"]
    assert records(engine)["1446/00505"][3] == "الاسم, مع فاصلة"


def test_a_windows_1256_export_reads_back_equal_to_its_utf8_twin(db_url: str, tmp_path: Path) -> None:
    body = GOOD + "1446/00600,rights,received,n@x.example,نورة بنت عبدالله القحطاني,2025-01-22T08:00:00+03:00\n"
    utf8 = tmp_path / "utf8.csv"
    utf8.write_text(HEADER + body, encoding="utf-8")
    excel = tmp_path / "excel.csv"
    excel.write_bytes((HEADER + body).replace("\n", "\r\n").replace("١٤٤٦/٠٠٤٠٠", "1446/00400").encode("cp1256"))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(codecs.BOM_UTF8 + (HEADER + body).encode("utf-8"))
    seen = {}
    for path, encoding in ((utf8, "UTF-8"), (excel, "Windows-1256"), (bom, "UTF-8 (with BOM)")):
        url = f"sqlite:///{tmp_path / (path.stem + '.db')}"
        db.upgrade(url)
        result = run(url, "transactions", "import", str(path))
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"imported {path} ({encoding}): 3 new")
        seen[encoding] = records(db.get_engine(url))
    assert seen["Windows-1256"] == seen["UTF-8"] == seen["UTF-8 (with BOM)"]
    assert seen["Windows-1256"]["1446/00600"][3] == "نورة بنت عبدالله القحطاني"


def test_a_semicolon_separated_export_is_read(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    path = tmp_path / "semicolon.csv"
    path.write_text(HEADER.replace(",", ";") + GOOD.replace(",", ";").replace(";a@x.example; B@y.example;",
                                                                               ";a@x.example B@y.example;"),
                    encoding="utf-8")
    report = import_csv(engine, path, rules)
    assert (report.applied, report.created, report.errors) == (True, 2, [])
    assert records(engine)["1446/00400"][2] == "a@x.example b@y.example"


def test_a_tab_separated_export_is_refused_with_a_hint(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    path = tmp_path / "tabs.csv"
    path.write_text(HEADER.replace(",", "\t") + GOOD.replace(",", "\t"), encoding="utf-8")
    report = import_csv(engine, path, rules)
    assert not report.applied and records(engine) == {}
    assert report.errors[0].endswith("(the file is tab-separated: save it as CSV with ',' or ';')")


def test_every_error_of_a_line_is_reported(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    report = import_csv(engine, csv_file(tmp_path, "1446/12,courts,lost,nobody,x,yesterday\n"), rules)
    assert report.errors == [
        "line 2: bad transaction number '1446/12' (expected YYYY/SERIAL, e.g. 1446/00321)",
        "line 2: unknown department 'courts' (expected rights, prisons, criminal, statements, governorates, "
        "completion, general)",
        "line 2: unknown status 'lost' (expected received, under_review, awaiting_documents, forwarded, completed, "
        "rejected)",
        "line 2: bad email 'nobody'",
        "line 2: bad date 'yesterday' (expected ISO 8601, e.g. 2025-01-30T10:00:00+03:00)",
    ]
    assert report.bad_lines == 1


def test_wrong_header_is_refused(engine: Engine, rules: Rules, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("number,dept,status\n1446/00321,prisons,received\n", encoding="utf-8")
    report = import_csv(engine, path, rules, skip_bad=True)
    assert report.errors == ["line 1: expected the header number,department,status,applicant_email,"
                             "applicant_name,updated_at, got 'number,dept,status'"]
    assert records(engine) == {}


def test_set_status_and_show(db_url: str, engine: Engine, rules: Rules, tmp_path: Path) -> None:
    import_csv(engine, csv_file(tmp_path, GOOD), rules)
    result = run(db_url, "transactions", "set-status", "1446/00321", "completed", "--note", "تم الإفراج")
    assert (result.exit_code, result.stdout) == (0, "1446/00321: under_review -> completed\n"
                                                    "no citizen is subscribed to it on the record: nobody is told\n")
    assert history(engine, "1446/00321")[-1] == ("under_review", "completed", "cli", "تم الإفراج")
    result = run(db_url, "transactions", "show", "١٤٤٦/٠٠٣٢١")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == ["number: 1446/00321", "department: prisons", "status: completed (منجزة / Completed)",
                         "applicant: أحمد الغامدي <ahmed@gmail.example>"]
    assert lines[5] == "history:"
    assert lines[6].endswith(" - -> under_review (csv)")
    assert lines[7].endswith(" under_review -> completed (cli) — تم الإفراج")


@pytest.mark.parametrize("args, message", [
    (("set-status", "1446/00321", "done"), "Error: unknown status 'done' (expected received, under_review, "
                                           "awaiting_documents, forwarded, completed, rejected)"),
    (("set-status", "1446/99999", "completed"), "Error: no transaction 1446/99999 on file"),
    (("set-status", "12345", "completed"), "Error: bad transaction number '12345' (expected YYYY/SERIAL, "
                                           "e.g. 1446/00321)"),
    (("show", "1446/99999"), "Error: no transaction 1446/99999 on file"),
])
def test_cli_errors_change_nothing(db_url: str, engine: Engine, rules: Rules, tmp_path: Path,
                                   args: tuple[str, ...], message: str) -> None:
    import_csv(engine, csv_file(tmp_path, GOOD), rules)
    before = records(engine), history(engine, "1446/00321")
    result = run(db_url, "transactions", *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message
    assert (records(engine), history(engine, "1446/00321")) == before


def test_set_status_unknown_raises(engine: Engine, rules: Rules) -> None:
    with pytest.raises(TransactionError, match=r"^no transaction 1446/00001 on file$"):
        set_status(engine, "1446/00001", "completed", rules)


def test_known_transactions(engine: Engine, rules: Rules) -> None:
    import_csv(engine, CORPUS / "samples" / "transactions.csv", rules)
    known = known_transactions(engine, ["1446/99999", "1446/00321", "1446/00321"])
    assert list(known) == ["1446/00321"]
    assert isinstance(known["1446/00321"], KnownTransaction)
    assert all(email == email.lower() for record in known.values() for email in record.applicant_emails)


def test_canonical_number(rules: Rules) -> None:
    assert canonical_number("۱۴۴۶-۰۰۳۲۱", rules) == "1446/00321"
    assert canonical_number(" 1446 / 123456 ", rules) == "1446/123456"
    assert canonical_number("1399/12345", rules) is None
    assert canonical_number("1446/123456789", rules) is None
    assert canonical_number("1446/00321/2", rules) is None
