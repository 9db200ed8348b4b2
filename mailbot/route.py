"""Understanding + Rules -> Decision: which department's queue a mail joins, and why.

Order (SPEC "Routing"), first match wins, every step tried is kept for
``mailbot rules explain`` and the decision log line:
1. a reply to an existing inquiry joins that inquiry's department;
2. admin rules from rules/routing.yaml, top-down;
3. the department of the first *known* transaction number;
4. department keywords (Arabic normalised), on subject + new text only;
5. ``general``.
Pure: the caller looks up the inquiry and the known transactions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from mailbot.rules import FALLBACK_DEPARTMENT, Match, Rules, RoutingRule
from mailbot.text import normalize_arabic
from mailbot.transactions import KnownTransaction

if TYPE_CHECKING:
    from mailbot.understand import Understanding

# Kinds that join no queue unless an admin rule names their kind explicitly.
UNROUTED_KINDS = ("auto_reply", "bulk", "bounce")

# Arabic words carry proclitics (و ف ب ل ك, then ال) and enclitics (ي ه ها هم نا كم ات ين ون ان);
# English keywords take plural and verb endings.  "Whole-word-ish": these may
# surround a keyword, other letters may not (so سجن never matches inside مسجلة).
_AR_PREFIX = r"(?:[وف]?(?:[بلك]|لل)?(?:ال)?)"
_AR_SUFFIX = r"(?:ي|ه|ها|هم|هن|نا|كم|كن|ات|ين|ون|ان|يه|يات)?"
_EN_SUFFIX = r"(?:s|es|d|ed|ing)?"
_ARABIC = re.compile("[\u0600-\u06ff]")


@dataclass(frozen=True)
class Decision:
    department: str | None  # None: the mail joins no queue (auto-reply, bulk, bounce)
    rule: str
    priority: str = "normal"
    tag: str | None = None
    no_auto_reply: bool = False
    evidence: str = ""
    tried: tuple[tuple[str, bool, str], ...] = ()


def normalize(text: str) -> str:
    return " ".join(normalize_arabic(text).lower().split())


def _arabic_pattern(keyword: str) -> str:
    pattern = re.escape(keyword).replace(r"\ ", r"\s+")
    # ة (normalised ه) becomes ت before a suffix: مطالبة -> مطالبتي, قرية -> قريتنا.
    if keyword.endswith("ه"):
        pattern = pattern[:-1] + "(?:ه|ت(?=[\u0621-\u064a]))"
    return pattern


class KeywordMatcher:
    """All keywords of a set, compiled into one regex: one scan per mail, whatever the count."""

    def __init__(self, keywords: Mapping[str, str]) -> None:
        """``keywords`` maps a keyword (any spelling) to what it stands for (a department id)."""
        self._owner: dict[str, str] = {}
        for keyword, owner in keywords.items():
            self._owner.setdefault(normalize(keyword), owner)
        words = sorted((k for k in self._owner if k), key=len, reverse=True)
        arabic = [_arabic_pattern(k) for k in words if _ARABIC.search(k)]
        latin = [re.escape(k).replace(r"\ ", r"\s+") for k in words if not _ARABIC.search(k)]
        parts = []
        if arabic:
            parts.append(rf"(?<!\w){_AR_PREFIX}(?P<ar>{'|'.join(arabic)}){_AR_SUFFIX}(?!\w)")
        if latin:
            parts.append(rf"(?<!\w)(?P<en>{'|'.join(latin)}){_EN_SUFFIX}(?!\w)")
        self._pattern = re.compile("|".join(parts)) if parts else None

    def find(self, text: str) -> list[tuple[str, str]]:
        """(keyword, owner) for each keyword occurrence in ``text``, in order."""
        if self._pattern is None:
            return []
        hits = []
        for found in self._pattern.finditer(normalize(text)):
            groups = found.groupdict()
            keyword = " ".join((groups.get("ar") or groups.get("en") or "").split())
            owner = self._owner.get(keyword) or self._owner[keyword[:-1] + "ه"]
            hits.append((keyword, owner))
        return hits


_matchers: dict[int, tuple[Rules, KeywordMatcher, dict[str, KeywordMatcher]]] = {}


def _compiled(rules: Rules) -> tuple[KeywordMatcher, dict[str, KeywordMatcher]]:
    """Department and per-rule keyword matchers, built once per loaded Rules."""
    cached = _matchers.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1], cached[2]
    departments = KeywordMatcher({
        keyword: department.id
        for department in rules.departments
        for keyword in department.keywords.ar + department.keywords.en
    })
    per_rule = {rule.id: KeywordMatcher({k: rule.id for k in rule.match.keywords or []}) for rule in rules.routing}
    if len(_matchers) > 8:  # a reloaded Rules replaces the old one; keep only a few alive
        _matchers.clear()
    _matchers[id(rules)] = (rules, departments, per_rule)
    return departments, per_rule


def recipients(u: Understanding) -> list[str]:
    mail = u.mail
    return [address.lower() for address in (*mail.to, *mail.cc, *mail.delivered_to) if address]


def _check(rule: RoutingRule, u: Understanding, rules: Rules, known: Mapping[str, KnownTransaction],
           keywords: KeywordMatcher) -> tuple[str | None, str]:
    """(department, why) when every condition of ``rule`` holds, else (None, the first that fails)."""
    match: Match = rule.match
    if match.kind is not None and u.kind not in match.kind:
        return None, f"kind {u.kind} not in {match.kind}"
    if match.kind is None and u.kind in UNROUTED_KINDS:
        return None, f"kind {u.kind} is not routed unless a rule names it"
    why: list[str] = []
    department = rule.department
    if match.recipient_alias:
        alias = next(((a, d) for a in recipients(u) if (d := rules.alias_department(a))), None)
        if alias is None:
            return None, "no department alias among the recipients"
        department = department or alias[1]
        why.append(f"addressed to {alias[0]}")
    for check in (_check_addresses, _check_content):
        failed = check(match, u, known, keywords, why)
        if failed:
            return None, failed
    if match.kind is not None:
        why.append(f"kind {u.kind}")
    return department, ", ".join(why)


def _check_addresses(match: Match, u: Understanding, known: Mapping[str, KnownTransaction],
                     keywords: KeywordMatcher, why: list[str]) -> str | None:
    """Why the recipient/sender conditions fail, or None (appending what held to ``why``)."""
    sender = (u.mail.sender or "").lower()
    if match.recipient is not None:
        wanted = {r.lower() for r in match.recipient}
        hit = next((a for a in recipients(u) if a in wanted), None)
        if hit is None:
            return f"no recipient in {sorted(wanted)}"
        why.append(f"addressed to {hit}")
    if match.sender is not None:
        if sender not in {s.lower() for s in match.sender}:
            return f"sender {sender or '(none)'} not listed"
        why.append(f"from {sender}")
    if match.sender_domain is not None:
        domain = sender.rpartition("@")[2]
        if not any(domain == d.lower() or domain.endswith("." + d.lower()) for d in match.sender_domain):
            return f"sender domain {domain or '(none)'} not listed"
        why.append(f"sender domain {domain}")
    return None


def _check_content(match: Match, u: Understanding, known: Mapping[str, KnownTransaction],
                   keywords: KeywordMatcher, why: list[str]) -> str | None:
    """Why the language/transaction/text conditions fail, or None (appending what held to ``why``)."""
    if match.language is not None:
        if u.language != match.language:
            return f"language {u.language} is not {match.language}"
        why.append(f"language {u.language}")
    if match.known_transaction is not None:
        on_file = [f.number for f in u.transactions if f.number in known]
        if bool(on_file) != match.known_transaction:
            return "a transaction is on file" if on_file else "no transaction on file"
        why.append(f"transaction {on_file[0]} on file" if on_file else "no transaction on file")
    text = f"{u.mail.subject}\n{u.new_text}"
    if match.keywords is not None:
        hits = keywords.find(text)
        if not hits:
            return "none of the keywords"
        why.append(f"keyword '{hits[0][0]}'")
    if match.regex is not None:
        found = re.search(match.regex, text)
        if found is None:
            return f"regex {match.regex!r} does not match"
        why.append(f"regex matched {found.group(0)[:40]!r}")
    return None


def route(u: Understanding, rules: Rules, known: Mapping[str, KnownTransaction],
          existing_department: str | None = None) -> Decision:
    """``existing_department``: the department of the inquiry this mail replies to, when found."""
    tried: list[tuple[str, bool, str]] = []
    if existing_department is not None:
        return Decision(existing_department, "reply-to-inquiry", evidence="reply to an existing inquiry",
                        tried=(("reply-to-inquiry", True, f"inquiry of {existing_department}"),))
    tried.append(("reply-to-inquiry", False, "no existing inquiry"))
    department_keywords, rule_keywords = _compiled(rules)
    for rule in rules.routing:
        department, why = _check(rule, u, rules, known, rule_keywords[rule.id])
        tried.append((rule.id, department is not None, why))
        if department is not None:
            return Decision(department, rule.id, rule.priority, rule.tag, rule.no_auto_reply, why, tuple(tried))
    if u.kind in UNROUTED_KINDS:
        return Decision(None, "not-routed", evidence=f"kind {u.kind}", tried=tuple(tried))
    if u.kind == "clerk_reply":
        department = rules.clerk_department(u.mail.sender)
        if department is not None:
            tried.append(("clerk", True, f"{u.mail.sender} is a clerk of {department}"))
            return Decision(department, "clerk", evidence=tried[-1][2], tried=tuple(tried))
    on_file = next((f.number for f in u.transactions if f.number in known), None)
    if on_file is not None:
        department = known[on_file].department
        why = f"transaction {on_file} on file in {department}"
        tried.append(("known-transaction", True, why))
        return Decision(department, "known-transaction", evidence=why, tried=tuple(tried))
    tried.append(("known-transaction", False, "no transaction on file"))
    hits = department_keywords.find(f"{u.mail.subject}\n{u.new_text}")
    if hits:
        counts = Counter(owner for _, owner in hits)
        # Most keywords wins; a tie goes to the department named first.
        department = max(counts, key=lambda owner: (counts[owner], -[o for _, o in hits].index(owner)))
        words = sorted({k for k, o in hits if o == department})
        why = f"keywords {', '.join(words)}"
        tried.append(("department-keywords", True, why))
        return Decision(department, "department-keywords", evidence=why, tried=tuple(tried))
    tried.append(("department-keywords", False, "no department keyword"))
    return Decision(FALLBACK_DEPARTMENT, FALLBACK_DEPARTMENT, evidence="nothing else matched", tried=tuple(tried))
