"""route.py: the SPEC routing order, admin rules, and keyword matching as people write."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
from click.testing import CliRunner

from mailbot.cli import cli
from mailbot.parse import parse_mail
from mailbot.route import Decision, KeywordMatcher, route
from mailbot.rules import Match, RoutingRule, Rules
from mailbot.transactions import KnownTransaction
from mailbot.understand import Understanding, understand

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
KNOWN = {
    "1446/00321": KnownTransaction("1446/00321", "prisons", "under_review", ("ahmed@gmail.example",)),
    "1446/55555": KnownTransaction("1446/55555", "general", "received", ("ahmed@gmail.example",)),
}


def mail(body: str, subject: str = "استفسار", to: str = "inquiries@emirate.example",
         sender: str = "ahmed@gmail.example", headers: str = "") -> bytes:
    head = dedent(f"""\
        From: Ahmed <{sender}>
        To: {to}
        Subject: {subject}
        Message-ID: <t-{abs(hash(body + subject + to))}@gmail.example>
        Date: Thu, 23 Jan 2025 09:30:00 +0300
        MIME-Version: 1.0
        Content-Type: text/plain; charset="utf-8"
        Content-Transfer-Encoding: 8bit
        """) + headers
    return (head + "\n" + dedent(body)).encode("utf-8")


def understood(raw: bytes, rules: Rules) -> Understanding:
    return understand(parse_mail(raw), rules)


def decide(raw: bytes, rules: Rules, **kwargs: object) -> Decision:
    return route(understood(raw, rules), rules, KNOWN, **kwargs)  # type: ignore[arg-type]


def test_existing_inquiry_comes_first(rules: Rules) -> None:
    raw = mail("بخصوص زيارة سجين", subject="Re: [INQ-000012] استفسار", to="criminal@emirate.example")
    decision = decide(raw, rules, existing_department="rights")
    assert (decision.department, decision.rule) == ("rights", "reply-to-inquiry")
    assert decision.tried == (("reply-to-inquiry", True, "inquiry of rights"),)


def test_department_alias_beats_known_transaction_and_keywords(rules: Rules) -> None:
    raw = mail("أرجو إفادتي عن المعاملة 1446/00321 الخاصة بزيارة سجين", to="criminal@emirate.example")
    decision = decide(raw, rules)
    assert (decision.department, decision.rule) == ("criminal", "department-alias")
    assert decision.evidence == "addressed to criminal@emirate.example"
    assert decision.tried == (("reply-to-inquiry", False, "no existing inquiry"),
                              ("department-alias", True, "addressed to criminal@emirate.example"))


@pytest.mark.parametrize("headers, to", [
    ("Cc: Completion <completion@emirate.example>\n", "inquiries@emirate.example"),
    ("X-Original-To: completion@emirate.example\n", "inquiries@emirate.example"),
    ("Delivered-To: completion@emirate.example\n", "inquiries@emirate.example"),
    ("", "COMPLETION@Emirate.Example"),
])
def test_alias_is_recognised_in_cc_and_delivery_headers(rules: Rules, headers: str, to: str) -> None:
    decision = decide(mail("السلام عليكم، متى تصدر الشهادة؟", to=to, headers=headers), rules)
    assert (decision.department, decision.rule) == ("completion", "department-alias")


def test_known_transaction_outranks_keywords_even_in_general(rules: Rules) -> None:
    decision = decide(mail("بلاغ سرقة، رقم المعاملة 1446/55555"), rules)
    assert (decision.department, decision.rule) == ("general", "known-transaction")
    assert decision.evidence == "transaction 1446/55555 on file in general"
    decision = decide(mail("I ask about a theft report, transaction 1446/99999 and 1446/00321"), rules)
    assert (decision.department, decision.rule) == ("prisons", "known-transaction")


def test_unknown_number_falls_through_to_keywords(rules: Rules) -> None:
    decision = decide(mail("أبغى أعرف وين وصل بلاغ السرقة رقم 1446/77777"), rules)
    assert (decision.department, decision.rule) == ("criminal", "department-keywords")
    assert decision.evidence == "keywords بلاغ, سرقه"
    assert [step[0] for step in decision.tried] == ["reply-to-inquiry", "department-alias", "known-transaction",
                                                    "department-keywords"]


@pytest.mark.parametrize("text, department", [
    ("متى يتم الإفراج عن أخي؟", "prisons"),  # hamza
    ("متى يتم الافراج عن اخي؟", "prisons"),  # hamza left out
    ("أخوي سجـــين من شهرين ونبي نزوره", "prisons"),  # tatweel
    ("أخي مَحْكُومٌ ونريد مدة الحكم", "prisons"),  # tashkeel
    ("ولدي موقوف في التوقيف من أمس", "prisons"),
    ("بخصوص مطالبه ماليه ضد شركة", "rights"),  # ة written ه
    ("أطلب إفاده بذلك للجهة", "statements"),
    ("نحتاج شهادة حسن سيرة وسلوك", "statements"),
    ("المقاول خلص الترميم ونبي شهادة انجاز", "completion"),
    ("طلب من المحافظ بخصوص الخدمات في قريتنا", "governorates"),
    ("تعرضت للاعتداء وسجلت محضر في مركز الشرطة", "criminal"),
    ("نفقة الأطفال لم تصرف منذ أشهر", "rights"),
    ("وين وصلت مطالبتي؟", "rights"),  # ة becomes ت before a suffix
    ("انسرقت سيارتي امس من قدام البيت", "criminal"),
    ("الطريق إلى قريتنا بحاجة إلى إنارة", "governorates"),
    ("My son was arrested yesterday, where is he held?", "prisons"),
    ("My brother was released last week but his papers are still held", "prisons"),
    ("I want to file a police report about a stolen car", "criminal"),
    ("We need a completion certificate for our villa", "completion"),
    ("I need a letter to whom it may concern", "statements"),
])
def test_department_keywords_as_people_write(rules: Rules, text: str, department: str) -> None:
    decision = decide(mail(text, subject="طلب"), rules)
    assert (decision.department, decision.rule) == (department, "department-keywords"), decision.evidence


def test_keywords_in_the_subject_count(rules: Rules) -> None:
    decision = decide(mail("السلام عليكم\nأرجو الرد", subject="زيارة سجين"), rules)
    assert (decision.department, decision.rule) == ("prisons", "department-keywords")


def test_keywords_only_in_quoted_text_do_not_count(rules: Rules) -> None:
    body = """\
        شكراً على الرد، متى أراجعكم؟

        On Mon, 20 Jan 2025 at 10:00, Citizen Services <inquiries@emirate.example> wrote:
        > بخصوص بلاغ السرقة والإفراج عن السجين
        """
    decision = decide(mail(body), rules)
    assert (decision.department, decision.rule) == ("general", "general")


@pytest.mark.parametrize("text", [
    "بناءً على طلبكم أرسل لكم الأوراق",  # "based on", not building
    "المعاملة مسجلة عندكم منذ شهر",  # مسجلة contains سج but is no prison
    "متى يتم إنجاز معاملتي؟",  # finishing a transaction is no completion certificate
    "أرجو الإفادة عن موعد المراجعة",  # "please let me know", not a statement request
    "نأمل إفادتي بما تم",
    "Thanks for the prompt reply",  # no 'prison' inside 'prompt', no 'release' inside anything
])
def test_keywords_match_whole_words_only(rules: Rules, text: str) -> None:
    decision = decide(mail(text, subject="متابعة"), rules)
    assert (decision.department, decision.rule) == ("general", "general"), decision.evidence


def test_most_keywords_win(rules: Rules) -> None:
    decision = decide(mail("ابني موقوف بسبب مضاربة، متى الإفراج؟ وهل تسمحون بزيارة سجين؟"), rules)
    assert decision.department == "prisons"


def test_bounces_and_auto_replies_join_no_queue(rules: Rules) -> None:
    raw = mail("I am out of the office until Sunday.", subject="Out of office", to="prisons@emirate.example",
               headers="Auto-Submitted: auto-replied\n")
    decision = decide(raw, rules)
    assert (decision.department, decision.rule) == (None, "not-routed")
    assert decision.tried[1] == ("department-alias", False, "kind auto_reply is not routed unless a rule names it")


def test_clerk_reply_goes_to_the_clerks_department(rules: Rules) -> None:
    raw = mail("تمت مراجعة الطلب", subject="Re: [INQ-000012] استفسار", sender="m.alzahrani@emirate.example",
               headers="In-Reply-To: <inq-12-fwd@emirate.example>\n")
    decision = decide(raw, rules)
    assert (decision.department, decision.rule) == ("criminal", "clerk")


def with_rules(rules: Rules, *extra: RoutingRule) -> Rules:
    return rules.model_copy(update={"routing": [*extra, *rules.routing]})


def test_admin_rules_top_down_first_match_wins(rules: Rules) -> None:
    custom = with_rules(
        rules,
        RoutingRule(id="court-letters", match=Match(sender_domain=["court.example"], keywords=["حكم"]),
                    department="rights", priority="high", tag="court"),
        RoutingRule(id="court-all", match=Match(sender_domain=["court.example"]), department="general",
                    no_auto_reply=True),
    )
    raw = mail("مرفق صورة الحكم الصادر", to="prisons@emirate.example", sender="clerk@moj.court.example")
    decision = decide(raw, custom)
    assert (decision.department, decision.rule, decision.priority, decision.tag) == ("rights", "court-letters",
                                                                                      "high", "court")
    assert decision.evidence == "sender domain moj.court.example, keyword 'حكم'"
    decision = decide(mail("مرفق الخطاب", sender="clerk@court.example"), custom)
    assert (decision.department, decision.rule, decision.no_auto_reply) == ("general", "court-all", True)
    assert decision.tried[1] == ("court-letters", False, "none of the keywords")
    decision = decide(mail("مرفق الخطاب", sender="clerk@notcourt.example"), custom)
    assert decision.tried[1] == ("court-letters", False, "sender domain notcourt.example not listed")


def test_admin_rule_conditions(rules: Rules) -> None:
    custom = with_rules(
        rules,
        RoutingRule(id="urgent-en", match=Match(language="en", regex=r"(?i)\burgent\b"), department="criminal",
                    priority="high"),
        RoutingRule(id="on-file", match=Match(known_transaction=True, recipient=["vip@emirate.example"]),
                    department="statements"),
        RoutingRule(id="lists", match=Match(kind=["bulk"]), department="general", no_auto_reply=True),
    )
    assert decide(mail("URGENT: please call me"), custom).rule == "urgent-en"
    assert decide(mail("عاجل urgent جدا"), custom).tried[1] == ("urgent-en", False, "language ar is not en")
    assert decide(mail("status of 1446/00321 please", to="vip@emirate.example"), custom).rule == "on-file"
    assert decide(mail("status of 1446/99999 please", to="vip@emirate.example"), custom).tried[2] == (
        "on-file", False, "no transaction on file")
    bulk = mail("Our newsletter", headers="List-Id: <news.example.org>\n")
    assert (decide(bulk, custom).department, decide(bulk, custom).rule) == ("general", "lists")


def test_keyword_matcher_normalises_keywords_too() -> None:
    matcher = KeywordMatcher({"إطلاق سراح": "prisons", "شهادة الإنجاز": "completion", "hit and run": "criminal"})
    assert matcher.find("نطلب اطلاق  سراح الموقوف") == [("اطلاق سراح", "prisons")]
    assert matcher.find("وصلتنا شهاده الانجاز؟") == [("شهاده الانجاز", "completion")]
    assert matcher.find("A HIT AND RUN near the mall") == [("hit and run", "criminal")]
    assert matcher.find("٠١٢ nothing here") == []


def test_cli_rules_explain(sqlite_url: str, tmp_path: Path) -> None:
    samples = CORPUS / "samples"
    env = {"MAILBOT_DB": sqlite_url}
    runner = CliRunner()
    assert runner.invoke(cli, ["transactions", "import", str(samples / "transactions.csv")], env=env).exit_code == 0
    result = runner.invoke(cli, ["rules", "explain", str(samples / "mail" / "037-trusted-fail-forged-pass.eml")],
                           env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[lines.index("rules tried:"):] == [
        "rules tried:",
        "  no    reply-to-inquiry: no existing inquiry",
        "  no    department-alias: no department alias among the recipients",
        "  MATCH known-transaction: transaction 1446/73003 on file in criminal",
        "decision: department=criminal rule=known-transaction priority=normal",
        "sender d.wilson@contoso.example: NOT verified (dmarc=fail)",
        "disclosed: -",
        "reply: ack_unverified",
    ]
    assert "transaction: 1446/73003 in subject (on file: criminal, received)" in lines
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    result = runner.invoke(cli, ["rules", "explain", str(empty)], env=env)
    assert (result.exit_code, result.stderr) == (1, f"Error: {empty}: empty message\n")
