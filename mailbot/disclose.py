"""Who may see which status (SPEC "Who may see what"), and which acknowledgement follows.

A status is disclosed only to an applicant email on record, and only when the
From address is not disproved by a trusted receiving server's
Authentication-Results (RFC 8601).  Headers from other servers are ignored: any
server on the way, or the sender, can write one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from mailbot.rules import Rules
from mailbot.transactions import KnownTransaction

if TYPE_CHECKING:
    from mailbot.route import Decision
    from mailbot.understand import Understanding

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s;=]+|=|;')


@dataclass(frozen=True)
class AuthResult:
    method: str  # lower case: dmarc, spf, dkim, ...
    result: str  # lower case: pass, fail, none, ...
    properties: dict[str, str]  # "smtp.mailfrom" -> value, keys lower case


def _strip_comments(value: str) -> str:
    """RFC 8601 values may carry (comments), nested, outside quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                out.append(char)
            continue
        if quoted:
            quoted = char != '"'
            out.append(char)
        elif char == '"' and depth == 0:
            quoted = True
            out.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
    return " ".join("".join(out).split())


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] == '"':
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def parse_authentication_results(value: str) -> tuple[str, list[AuthResult]]:
    """(authserv-id lower-cased, results) of one Authentication-Results header value."""
    tokens = _TOKEN.findall(_strip_comments(value))
    statements: list[list[str]] = [[]]
    for token in tokens:
        if token == ";":
            statements.append([])
        else:
            statements[-1].append(token)
    head = statements[0]
    authserv_id = _unquote(head[0]).lower() if head else ""
    results = []
    for statement in statements[1:]:
        if len(statement) < 3 or statement[1] != "=":
            continue  # "none" or a malformed resinfo proves nothing
        method = statement[0].split("/")[0].lower()
        pairs: dict[str, str] = {}
        rest = statement[3:]
        for i in range(len(rest) - 2):
            # ptype.property=value; "reason=..." is free text, not evidence
            if rest[i + 1] == "=" and "." in rest[i]:
                pairs.setdefault(rest[i].lower(), _unquote(rest[i + 2]))
        results.append(AuthResult(method, _unquote(statement[2]).lower(), pairs))
    return authserv_id, results


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(".").lower()


def is_sender_verified(sender: str | None, headers: tuple[str, ...], rules: Rules) -> tuple[bool, str]:
    """Whether the From address may be believed, and why."""
    trusted_ids = {authserv_id.lower() for authserv_id in rules.policy.trusted_authserv_ids}
    results: list[AuthResult] = []
    trusted = 0
    for header in headers:
        authserv_id, found = parse_authentication_results(header)
        if authserv_id in trusted_ids:
            trusted += 1
            results.extend(found)
    if not trusted:
        if rules.policy.require_authentication:
            return False, "no trusted Authentication-Results and authentication is required"
        return True, "no trusted Authentication-Results; From address alone"
    from_domain = _domain(sender or "")
    dmarc = [result.result for result in results if result.method == "dmarc"]
    if dmarc:
        passed = "pass" in dmarc and "fail" not in dmarc
        return passed, f"dmarc={'pass' if passed else dmarc[0]}"
    for result in results:
        if result.result != "pass":
            continue
        if result.method == "spf" and _domain(result.properties.get("smtp.mailfrom", "")) == from_domain:
            return True, f"spf=pass aligned with {from_domain}"
        if result.method == "dkim" and _domain(result.properties.get("header.d", "")) == from_domain:
            return True, f"dkim=pass aligned with {from_domain}"
    return False, "trusted Authentication-Results shows no aligned pass"


def disclosed(u: Understanding, rules: Rules, known: Mapping[str, KnownTransaction]) -> list[str]:
    """Numbers in the mail whose status the reply may reveal to its sender."""
    if u.kind != "inquiry":
        return []
    sender = (u.mail.sender or "").lower()
    # Numbers only quoted from an earlier mail are not what this mail asks about.
    mine = [found.number for found in u.transactions if found.where != "quoted"
            and found.number in known and sender and sender in known[found.number].applicant_emails]
    if not mine or not is_sender_verified(sender, u.mail.auth_results, rules)[0]:
        return []
    return list(dict.fromkeys(mine))


def reply_template(u: Understanding, decision: Decision, shown: list[str]) -> str | None:
    """The acknowledgement for a new inquiry; None for every other kind or when the rule says so."""
    if u.kind != "inquiry" or decision.no_auto_reply:
        return None
    if shown:
        return "ack_status"
    asked = [found for found in u.transactions if found.where != "quoted"]
    return "ack_unverified" if asked else "ack_no_number"
