"""Transaction numbers in text, by the patterns of rules/transactions.yaml.

Digits are read in any script (0-9, ٠-٩, ۰-۹, mixed), direction marks are
ignored, then what is certainly not a transaction (phones, IBANs, dates, times,
the inquiry tag: ``ignore`` in the YAML) is blanked out.  What remains is read
as runs of digits joined by the allowed separators: two joined runs are YEAR
SERIAL (or SERIAL YEAR), one run of bare digits counts only after a cue word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailbot.rules import TransactionRules
from mailbot.text import BIDI_MARKS, normalize_arabic, normalize_digits

YEAR_SERIAL = "year-serial"
SERIAL_YEAR = "serial-year"
CUE_BARE = "cue-bare"

# A citizen's question names a handful of numbers; a text with hundreds (a
# pasted report, a hostile mail) is read no further than this.
MAX_FOUND = 200
_MASK = "\x00"  # neither digit, separator nor letter: masked text joins nothing
_WINDOW = 48  # characters of context read before and after a number
_RUN = re.compile(r"\d+")
_ARABIC_SUFFIX = "[\u0621-\u064a]{0,3}"
_FILLER = r"[\s:#.\-–—()\[\]=]*"
_NUMBER_WORD = rf"(?:(?:رقم|رقمها|رقمه|هو|هي|no|nr|num|number|is){_FILLER})?"


@dataclass(frozen=True)
class Found:
    number: str  # canonical YEAR/SERIAL
    where: str  # subject | new | signature | quoted
    pattern: str  # year-serial | serial-year | cue-bare
    written: str  # as the citizen wrote it


@dataclass(frozen=True)
class _Patterns:
    rules: TransactionRules
    ignore: tuple[re.Pattern[str], ...]
    joiner: re.Pattern[str]
    cue: re.Pattern[str]
    not_after: re.Pattern[str] | None
    not_before: re.Pattern[str] | None
    year_digits: int


_compiled: dict[int, _Patterns] = {}


def _words(words: list[str]) -> str:
    parts = []
    for word in sorted({normalize_arabic(w).lower() for w in words}, key=len, reverse=True):
        escaped = re.escape(word).replace(r"\ ", r"\s+")
        parts.append(rf"(?<!\w){escaped}" if re.match(r"\w", word) else escaped)
    return "|".join(parts)


def _compile(rules: TransactionRules) -> _Patterns:
    cached = _compiled.get(id(rules))
    if cached is not None and cached.rules is rules:
        return cached
    separators = [s for s in rules.separators if s.strip()]
    joiner = rf"(?: *([{''.join(re.escape(s) for s in separators)}]) *|( ))\Z" if separators else r"( )\Z"
    cues = _words(rules.cue_words.ar + rules.cue_words.en)
    after = _words(rules.not_after.ar + rules.not_after.en)
    before = _words(rules.not_before.ar + rules.not_before.en)
    patterns = _Patterns(
        rules=rules,
        ignore=tuple(re.compile(p.regex, re.IGNORECASE) for p in rules.ignore),
        joiner=re.compile(joiner if " " in rules.separators else joiner.replace("|( )", "")),
        cue=re.compile(rf"(?:{cues}){_FILLER}{_NUMBER_WORD}$" if cues else r"(?!)"),
        not_after=re.compile(rf"(?:{after}){_ARABIC_SUFFIX}{_FILLER}{_NUMBER_WORD}$") if after else None,
        not_before=re.compile(rf"^\s*(?:{before})(?!\w)") if before else None,
        year_digits=len(str(rules.year.max)),
    )
    _compiled.clear()  # one rules object is in force at a time
    _compiled[id(rules)] = patterns
    return patterns


def _clean(text: str) -> tuple[str, list[int]]:
    """Digits as 0-9, direction marks dropped; keep[i] is the index in ``text`` of cleaned[i]."""
    keep = [i for i, char in enumerate(text) if char not in BIDI_MARKS]
    cleaned = normalize_digits("".join(text[i] for i in keep)).replace("\u00a0", " ").replace("\u202f", " ")
    return cleaned, keep


def _mask(text: str, patterns: _Patterns) -> str:
    for pattern in patterns.ignore:
        text = pattern.sub(lambda m: _MASK * len(m.group(0)), text)
    return text


def _year(run: str, p: _Patterns) -> bool:
    return len(run) == p.year_digits and p.rules.year.min <= int(run) <= p.rules.year.max


def _serial(run: str, p: _Patterns) -> bool:
    return p.rules.serial_digits.min <= len(run) <= p.rules.serial_digits.max


def _context_rejects(text: str, start: int, end: int, p: _Patterns) -> bool:
    before = normalize_arabic(text[max(0, start - _WINDOW):start]).lower()
    after = normalize_arabic(text[end:end + _WINDOW]).lower()
    if before.endswith("+"):
        return True
    if p.not_after is not None and p.not_after.search(before):
        return True
    return p.not_before is not None and bool(p.not_before.match(after))


def _has_cue(text: str, start: int, p: _Patterns) -> bool:
    return bool(p.cue.search(normalize_arabic(text[max(0, start - _WINDOW):start]).lower()))


def extract_transactions(text: str, rules: TransactionRules, where: str) -> list[Found]:
    """Transaction numbers in ``text`` in order of appearance (duplicates kept, at most MAX_FOUND)."""
    p = _compile(rules)
    cleaned, keep = _clean(text)
    masked = _mask(cleaned, p)
    runs = list(_RUN.finditer(masked))
    # joins[i]: the separator between runs i and i+1, or None when they are not joined.
    joins: list[str | None] = []
    for left, right in zip(runs, runs[1:]):
        joined = p.joiner.match(masked[left.end():right.start()])
        joins.append((joined.group(1) or joined.group(2)) if joined else None)
    found: list[Found] = []
    i = 0
    while i < len(runs) and len(found) < MAX_FOUND:
        pair = _read_pair(runs, joins, i, masked, p) if i < len(joins) and joins[i] else None
        if pair is not None:
            number, pattern = pair
            start, end = runs[i].start(), runs[i + 1].end()
            found.append(Found(number, where, pattern, text[keep[start]:keep[end - 1] + 1]))
            i += 2
            continue
        bare = _read_bare(runs[i], masked, p)
        if bare is not None:
            start, end = runs[i].start(), runs[i].end()
            found.append(Found(bare, where, CUE_BARE, text[keep[start]:keep[end - 1] + 1]))
        i += 1
    return found


def _read_pair(runs: list[re.Match[str]], joins: list[str | None], i: int, text: str,
               p: _Patterns) -> tuple[str, str] | None:
    separator = joins[i]
    # Three runs joined by the same separator are a date, a phone or an account number.
    if (i > 0 and joins[i - 1] == separator) or (i + 1 < len(joins) and joins[i + 1] == separator):
        return None
    first, second = runs[i].group(), runs[i + 1].group()
    if _context_rejects(text, runs[i].start(), runs[i + 1].end(), p):
        return None
    if _year(first, p) and _year(second, p) and int(second) == int(first) + 1:
        return None  # a span of years ("1445-1446"), not a transaction
    if _year(first, p) and _serial(second, p):
        return f"{first}/{second}", YEAR_SERIAL
    if p.rules.reversed and _serial(first, p) and _year(second, p):
        return f"{second}/{first}", SERIAL_YEAR
    return None


def _read_bare(run: re.Match[str], text: str, p: _Patterns) -> str | None:
    digits = run.group()
    if not p.rules.bare_digits.min <= len(digits) <= p.rules.bare_digits.max:
        return None
    year, serial = digits[:p.year_digits], digits[p.year_digits:]
    if not (_year(year, p) and _serial(serial, p) and _has_cue(text, run.start(), p)):
        return None
    if p.not_before is not None and p.not_before.match(normalize_arabic(text[run.end():run.end() + _WINDOW]).lower()):
        return None
    return f"{year}/{serial}"


def extract_all(sections: list[tuple[str, str]], rules: TransactionRules) -> tuple[Found, ...]:
    """Numbers from (where, text) sections in the given order of relevance, each number once."""
    seen: set[str] = set()
    result: list[Found] = []
    for where, text in sections:
        for item in extract_transactions(text, rules, where):
            if item.number not in seen:
                seen.add(item.number)
                result.append(item)
    return tuple(result)
