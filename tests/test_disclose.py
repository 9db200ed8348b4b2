"""disclose.py: only the applicant, only when trusted authentication does not disprove the From address."""

from __future__ import annotations

from textwrap import dedent

import pytest

from mailbot.disclose import AuthResult, disclosed, is_sender_verified, parse_authentication_results, reply_template
from mailbot.parse import parse_mail
from mailbot.route import Decision
from mailbot.rules import Policy, Rules
from mailbot.transactions import KnownTransaction
from mailbot.understand import Understanding, understand

KNOWN = {
    "1446/00321": KnownTransaction("1446/00321", "prisons", "under_review", ("majed.alsubaie@outlook.example",)),
    "1446/00400": KnownTransaction("1446/00400", "rights", "completed", ("someone.else@gmail.example",)),
}
TRUSTED = "mx.emirate.example"


def mail(auth: list[str], sender: str = "Majed.Alsubaie@Outlook.example", body: str = "",
         headers: str = "") -> bytes:
    results = "".join(f"Authentication-Results: {value}\n" for value in auth)
    text = results + dedent(f"""\
        From: ماجد السبيعي <{sender}>
        To: inquiries@emirate.example
        Subject: استفسار عن المعاملة 1446/00321
        Message-ID: <d-{abs(hash(tuple(auth) + (sender, body, headers)))}@outlook.example>
        Date: Thu, 23 Jan 2025 09:30:00 +0300
        MIME-Version: 1.0
        Content-Type: text/plain; charset="utf-8"
        Content-Transfer-Encoding: 8bit
        """) + headers + "\n" + (body or "أرجو إفادتي بحالة المعاملة 1446/00321 و 1446/00400\n")
    return text.encode("utf-8")


def seen(raw: bytes, rules: Rules) -> list[str]:
    return disclosed(understand(parse_mail(raw), rules), rules, KNOWN)


def test_parse_authentication_results_rfc8601() -> None:
    value = ('mx.emirate.example 1; (a comment; with = signs) spf=pass (mx.emirate.example: domain of '
             'a@b designates 1.2.3.4) smtp.mailfrom="Majed.Alsubaie@Outlook.example"; '
             'DKIM=Pass (2048-bit key) header.d=outlook.example header.i=@outlook.example header.b=AbC; '
             'dmarc=pass (p=QUARANTINE sp=NONE) header.from=outlook.example')
    authserv_id, results = parse_authentication_results(value)
    assert authserv_id == "mx.emirate.example"
    assert results == [
        AuthResult("spf", "pass", {"smtp.mailfrom": "Majed.Alsubaie@Outlook.example"}),
        AuthResult("dkim", "pass", {"header.d": "outlook.example", "header.i": "@outlook.example", "header.b": "AbC"}),
        AuthResult("dmarc", "pass", {"header.from": "outlook.example"}),
    ]
    assert parse_authentication_results("MX.Emirate.Example; none") == ("mx.emirate.example", [])
    assert parse_authentication_results('(relay) "mx.emirate.example"; dmarc=fail reason="p=reject"') == (
        "mx.emirate.example", [AuthResult("dmarc", "fail", {})])


def test_no_trusted_header_the_from_address_decides(rules: Rules) -> None:
    assert seen(mail([]), rules) == ["1446/00321"]  # mixed case on record and in From
    assert seen(mail([], sender="majed@gmail.example"), rules) == []


def test_display_name_and_reply_to_do_not_count(rules: Rules) -> None:
    raw = dedent("""\
        From: "majed.alsubaie@outlook.example" <attacker@evil.example>
        Reply-To: majed.alsubaie@outlook.example
        To: inquiries@emirate.example
        Subject: 1446/00321
        Message-ID: <spoof-1@evil.example>
        Content-Type: text/plain; charset="utf-8"

        status of 1446/00321 please
        """).encode()
    assert seen(raw, rules) == []


def test_trusted_dmarc_pass_discloses(rules: Rules) -> None:
    raw = mail([f"{TRUSTED}; spf=pass smtp.mailfrom=outlook.example; dmarc=pass header.from=outlook.example"])
    assert seen(raw, rules) == ["1446/00321"]


def test_spoofed_from_with_trusted_dmarc_fail_discloses_nothing(rules: Rules) -> None:
    raw = mail([f"{TRUSTED}; spf=pass smtp.mailfrom=evil.example; dkim=none; dmarc=fail (p=NONE) "
                "header.from=outlook.example"])
    assert seen(raw, rules) == []
    u = understand(parse_mail(raw), rules)
    assert is_sender_verified(u.mail.sender, u.mail.auth_results, rules) == (False, "dmarc=fail")
    assert reply_template(u, Decision("prisons", "known-transaction"), []) == "ack_unverified"


def test_dmarc_pass_from_an_untrusted_server_counts_for_nothing(rules: Rules) -> None:
    raw = mail([
        "mx.emirate-example.net; dmarc=pass header.from=outlook.example",  # look-alike, added by the sender
        f"{TRUSTED}; spf=none smtp.mailfrom=evil.example; dkim=none",
    ])
    assert seen(raw, rules) == []
    u = understand(parse_mail(raw), rules)
    assert is_sender_verified(u.mail.sender, u.mail.auth_results, rules) == (
        False, "trusted Authentication-Results shows no aligned pass")


@pytest.mark.parametrize("result, shown", [
    ("spf=pass smtp.mailfrom=majed.alsubaie@outlook.example", ["1446/00321"]),
    ("spf=pass smtp.mailfrom=OUTLOOK.example", ["1446/00321"]),
    ("spf=pass smtp.mailfrom=bounces@mailer.example", []),  # not aligned
    ("dkim=pass header.d=outlook.example", ["1446/00321"]),
    ("dkim=pass header.d=mailer.example", []),
    ("dkim=fail header.d=outlook.example; spf=softfail smtp.mailfrom=outlook.example", []),
    ("spf=pass smtp.mailfrom=outlook.example; dmarc=fail header.from=outlook.example", []),  # dmarc decides
])
def test_without_dmarc_an_aligned_spf_or_dkim_pass(rules: Rules, result: str, shown: list[str]) -> None:
    assert seen(mail([f"{TRUSTED}; {result}"]), rules) == shown


def test_require_authentication_needs_a_trusted_header(rules: Rules) -> None:
    strict = rules.model_copy(update={"policy": Policy(trusted_authserv_ids=[TRUSTED], require_authentication=True)})
    assert seen(mail([]), strict) == []
    assert seen(mail(["mx.emirate-example.net; dmarc=pass"]), strict) == []
    assert seen(mail([f"{TRUSTED}; dmarc=pass"]), strict) == ["1446/00321"]


def test_only_inquiries_disclose(rules: Rules) -> None:
    raw = mail([], headers="Auto-Submitted: auto-replied\n")
    u = understand(parse_mail(raw), rules)
    assert u.kind == "auto_reply"
    assert disclosed(u, rules, KNOWN) == []
    assert reply_template(u, Decision(None, "not-routed"), []) is None


def understood(rules: Rules, body: str) -> Understanding:
    return understand(parse_mail(mail([], body=body)), rules)


def test_reply_choice(rules: Rules) -> None:
    decision = Decision("prisons", "known-transaction")
    u = understood(rules, "حالة المعاملة 1446/00321 لو سمحتم\n")
    assert reply_template(u, decision, disclosed(u, rules, KNOWN)) == "ack_status"
    u = understood(rules, "حالة المعاملة 1446/00400 لو سمحتم\n")  # someone else's
    assert disclosed(u, rules, KNOWN) == ["1446/00321"]  # the subject names 1446/00321
    raw = mail([], body="ما هي حالة معاملتي؟\n").replace("1446/00321".encode(), b"")
    u = understand(parse_mail(raw), rules)
    assert reply_template(u, decision, disclosed(u, rules, KNOWN)) == "ack_no_number"
    raw = mail([], body="حالة المعاملة 1446/00400\n").replace(b"1446/00321", b"")
    u = understand(parse_mail(raw), rules)
    assert reply_template(u, decision, disclosed(u, rules, KNOWN)) == "ack_unverified"
    quiet = Decision("general", "lists", no_auto_reply=True)
    assert reply_template(u, quiet, []) is None
