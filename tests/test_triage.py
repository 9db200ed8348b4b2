"""`mailbot triage`: one JSON line per file, side-effect free, never a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from textwrap import dedent

import pytest
from click.testing import CliRunner

from mailbot import db
from mailbot.cli import cli
from mailbot.rules import Rules
from mailbot.transactions import import_csv
from mailbot.triage import read_only_lookup, triage_file

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
FIELDS = ["file", "message_id", "kind", "language", "transactions", "department", "rule", "reply", "disclosed"]

INQUIRY = dedent(
    """\
    From: Ahmed <ahmed.alqahtani@sahab.example>
    To: inquiries@emirate.example
    Subject: =?UTF-8?B?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=
    Message-ID: <q1@sahab.example>
    Content-Type: text/plain; charset=utf-8

    السلام عليكم، وش صار على المعاملة رقم ١٤٤٦/٠٠٣٢١ ؟
    -- 
    جوال: 0551234567
    """
).encode("utf-8")
NO_NUMBER = b"From: tom@contoso.example\nSubject: Office hours\nMessage-ID: <q2@contoso.example>\n\nOpen when?\n"
AUTO = b"From: a@b.example\nSubject: Out of Office\nAuto-Submitted: auto-replied\n\nAway.\n"


def run(args: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["triage", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.output.splitlines()


@pytest.fixture
def mails(tmp_path: Path) -> Path:
    folder = tmp_path / "mail"
    (folder / "sub").mkdir(parents=True)
    (folder / "b-inquiry.eml").write_bytes(INQUIRY)
    (folder / "a-no-number.eml").write_bytes(NO_NUMBER)
    (folder / "sub" / "c-auto.eml").write_bytes(AUTO)
    (folder / "d-garbage.eml").write_bytes(b"\x00\x01 no headers here at all")
    return folder


def test_json_lines_with_exactly_the_contract_fields(mails: Path, tmp_path: Path) -> None:
    database = tmp_path / "absent" / "mailbot.db"
    code, lines = run([str(mails), "--json"], {"MAILBOT_DB": f"sqlite:///{database}"})
    assert code == 0
    results = [json.loads(line) for line in lines]
    assert [Path(r["file"]).name for r in results] == ["a-no-number.eml", "b-inquiry.eml", "d-garbage.eml",
                                                       "c-auto.eml"]
    no_number, inquiry, garbage, auto = results
    assert list(inquiry) == FIELDS
    assert inquiry == {
        "file": str(mails / "b-inquiry.eml"), "message_id": "<q1@sahab.example>", "kind": "inquiry",
        "language": "ar", "transactions": ["1446/00321"], "department": "general", "rule": "general",
        "reply": "ack_unverified", "disclosed": [],
    }
    assert (no_number["language"], no_number["transactions"], no_number["reply"]) == ("en", [], "ack_no_number")
    assert (auto["kind"], auto["department"], auto["reply"], auto["disclosed"]) == ("auto_reply", None, None, [])
    assert garbage["kind"] is None
    assert garbage["error"] == "cannot parse: no headers"
    # Side-effect free: the missing database was not created, nor its folder.
    assert not database.parent.exists()


def test_missing_file_is_a_line_with_the_reason(tmp_path: Path) -> None:
    code, lines = run([str(tmp_path / "nope.eml"), "--json"], {"MAILBOT_DB": f"sqlite:///{tmp_path / 'x.db'}"})
    assert code == 0
    [line] = lines
    assert json.loads(line)["error"] == "cannot read file: No such file or directory"
    assert not (tmp_path / "x.db").exists()


def test_readable_explanation(mails: Path, tmp_path: Path) -> None:
    code, lines = run([str(mails / "b-inquiry.eml")], {"MAILBOT_DB": f"sqlite:///{tmp_path / 'x.db'}"})
    text = "\n".join(lines)
    assert code == 0
    assert "kind:       inquiry — none of bounce, auto-reply, bulk, clerk, follow-up applies" in text
    assert "language:   ar — letters of the new text are mostly Arabic" in text
    assert "1446/00321  in new, pattern year-serial, written '١٤٤٦/٠٠٣٢١'" in text
    assert "reply:      ack_unverified; disclosed: nothing" in text


def test_reads_transactions_without_writing(db_url: str, tmp_path: Path, rules: Rules) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "number,department,status,applicant_email,applicant_name,updated_at\n"
        "1446/00321,rights,under_review,Ahmed.AlQahtani@sahab.example,أحمد,2025-01-12T10:15:00+03:00\n",
        encoding="utf-8",
    )
    report = import_csv(db.get_engine(db_url), csv, rules)
    assert report.errors == [] and report.created == 1
    db.dispose_engines()
    database = Path(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in database.parent.iterdir()} if database else {}
    lookup, engine = read_only_lookup(db_url)
    try:
        known = lookup(["1446/00321", "1446/99999"])
    finally:
        if engine is not None:
            engine.dispose()
    assert list(known) == ["1446/00321"]
    assert known["1446/00321"].department == "rights"
    assert known["1446/00321"].applicant_emails == ("ahmed.alqahtani@sahab.example",)
    if database is not None:
        after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in database.parent.iterdir()}
        assert after == before


def test_database_without_tables_knows_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    lookup, engine = read_only_lookup(f"sqlite:///{empty}")
    try:
        assert lookup(["1446/00321"]) == {}
    finally:
        engine.dispose()
    assert empty.read_bytes() == b""


def test_triage_file_is_the_single_decision_point(tmp_path: Path, rules: Rules) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(INQUIRY)
    result = triage_file(path, rules, lambda numbers: {})
    assert result.understanding is not None and result.understanding.numbers == ("1446/00321",)
    assert result.as_json()["reply"] == "ack_unverified"


def test_real_world_corpus_every_file_gets_a_line(tmp_path: Path) -> None:
    files = sorted(p for p in (CORPUS / "realworld").rglob("*") if p.is_file())
    code, lines = run([str(CORPUS / "realworld"), "--json"], {"MAILBOT_DB": f"sqlite:///{tmp_path / 'no.db'}"})
    assert code == 0
    results = [json.loads(line) for line in lines]
    assert [r["file"] for r in results] == [str(p) for p in files]
    for result in results:
        assert (result["kind"] is None) == ("error" in result), result
        if result["kind"] is None:
            assert result["error"].startswith("cannot parse: "), result
    assert os.listdir(tmp_path) == []
    # SPEC's contract: every sisimai delivery report is a bounce, and no report is answered.
    sisimai = [(Path(r["file"]).name, r) for r in results if "sisimai-set-of-emails" in r["file"]]
    reports = [r for name, r in sisimai if name.startswith(("lhost-", "rhost-", "rfc3464-"))]
    feedback = [r for name, r in sisimai if name.startswith("arf-")]
    assert (len(reports), len(feedback)) == (242, 19)
    assert [r["file"] for r in reports if r["kind"] != "bounce"] == []
    assert [r["file"] for r in reports + feedback if r["reply"] is not None] == []
    assert {r["kind"] for r in feedback} <= {"bounce", "auto_reply"}
