"""ParsedMail + Rules -> Understanding: what the mail is, in which language, about which numbers."""

from __future__ import annotations

from dataclasses import dataclass

from mailbot.classify import Bounce, classify, inquiry_tags
from mailbot.extract import Found, extract_all
from mailbot.parse import ParsedMail
from mailbot.rules import Rules
from mailbot.text import detect_language, split_mail, without_closing


@dataclass(frozen=True)
class Understanding:
    mail: ParsedMail
    new_text: str
    quoted_text: str
    signature: str
    kind: str
    kind_reason: str
    language: str
    language_reason: str
    transactions: tuple[Found, ...]  # subject, new text, signature, quoted text; each number once
    inquiry_tags: tuple[str, ...]
    bounce: Bounce | None

    @property
    def numbers(self) -> tuple[str, ...]:
        return tuple(found.number for found in self.transactions)


def understand(parsed: ParsedMail, rules: Rules) -> Understanding:
    split = split_mail(parsed.text, parsed.html, text_from_html=parsed.text_from_html)
    kind = classify(parsed, rules, parsed.text)
    language, language_reason = _language(without_closing(split.new), parsed.subject, split.quoted)
    quoted = "\n\n".join(text for text in (split.quoted, parsed.attached_text) if text)
    sections = [("subject", parsed.subject), ("new", split.new), ("signature", split.signature),
                ("quoted", quoted)]
    return Understanding(
        mail=parsed,
        new_text=split.new,
        quoted_text=quoted,
        signature=split.signature,
        kind=kind.kind,
        kind_reason=kind.reason,
        language=language,
        language_reason=language_reason,
        transactions=extract_all(sections, rules.transactions),
        inquiry_tags=inquiry_tags(parsed.subject),
        bounce=kind.bounce,
    )


def _language(new: str, subject: str, quoted: str) -> tuple[str, str]:
    for where, text in (("new text", new), ("subject", subject), ("quoted text", quoted)):
        if any(char.isalpha() for char in text):
            language = detect_language(text)
            return language, f"letters of the {where} are mostly {'Arabic' if language == 'ar' else 'Latin'}"
    return "ar", "no letters at all; the office's own language"
