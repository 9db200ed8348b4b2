"""Text of a mail: Arabic normalisation, digits, language, and what is new.

A citizen's mail is new text on top of a quoted earlier mail and a signature.
Only the new text says what this mail asks; quoted text and signatures are kept
apart so that later stages can weigh them less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from bs4 import BeautifulSoup, Tag

_ALEF = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ة": "ه", "ى": "ي"})
# Arabic-Indic (U+0660..) and Eastern Arabic/Persian (U+06F0..) digits.
_DIGITS = str.maketrans({**{chr(0x660 + i): str(i) for i in range(10)}, **{chr(0x6F0 + i): str(i) for i in range(10)}})
# Harakat, Quranic marks, superscript alef and tatweel carry no meaning for matching.
_TASHKEEL = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")
# Direction marks that RTL mail clients put between digits and separators.
BIDI_MARKS = "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
_BIDI = re.compile(f"[{BIDI_MARKS}]")
_ARABIC_LETTER = re.compile("[\u0621-\u064a\u066e-\u06d3\u06fa-\u06ff]")
_LATIN_LETTER = re.compile("[A-Za-z]")
_NOT_WORDS = re.compile(r"\S+@\S+|https?://\S+|www\.\S+")

QUOTE_MARK = "\u2063QUOTE\u2063"  # invisible separator: never typed by a person


def normalize_digits(text: str) -> str:
    return text.translate(_DIGITS)


def normalize_arabic(text: str) -> str:
    """Hamza forms of alef → ا, ة → ه, ى → ي, tashkeel/tatweel/bidi marks removed, digits → 0-9."""
    return _BIDI.sub("", _TASHKEEL.sub("", text)).translate(_ALEF).translate(_DIGITS)


def detect_language(text: str) -> str:
    """'ar' when Arabic letters are at least as many as Latin ones, else 'en'.

    Mail in a third script (Cyrillic, Japanese ...) is answered in English.
    """
    words = _NOT_WORDS.sub(" ", text)
    arabic = len(_ARABIC_LETTER.findall(words))
    return "ar" if arabic and arabic >= len(_LATIN_LETTER.findall(words)) else "en"


@dataclass(frozen=True)
class Split:
    new: str
    signature: str
    quoted: str


_BLOCK_TAGS = ("p", "div", "br", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
               "blockquote", "pre")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(html: str, *, mark_quote: bool = False) -> str:
    """Readable text of an HTML body; with mark_quote, QUOTE_MARK precedes the first quoted block."""
    marked = _quote_marked_text(html)
    return marked if mark_quote else _BLANK_LINES.sub("\n\n", marked.replace(QUOTE_MARK, "")).strip()


# parse_mail renders an HTML-only body, and split_mail the same body with its quote marked:
# the mark is its own line, so one parse gives both (the text without it is the same).
@lru_cache(maxsize=4)
def _quote_marked_text(html: str) -> str:
    soup = BeautifulSoup(html, "html.parser")
    for node in soup(["script", "style", "head", "title"]):
        node.decompose()
    quote = _first_quote(soup)
    if quote is not None:
        quote.insert_before(f"\n{QUOTE_MARK}\n")
    for node in soup.find_all(_BLOCK_TAGS):
        node.insert_before("\n")
        if node.name != "br":
            node.append("\n")
    lines = (_SPACES.sub(" ", line).strip() for line in soup.get_text().splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# Gmail: div.gmail_quote; Outlook: div#divRplyFwdMsg (the header block of the quoted
# mail), div#appendonsend or div.OutlookMessageHeader; Thunderbird: div.moz-cite-prefix
# or div.moz-forward-container; Apple and most others: blockquote.
_QUOTE_DIV_CLASSES = frozenset({"gmail_quote", "moz-cite-prefix", "moz-forward-container", "OutlookMessageHeader"})
_QUOTE_DIV_IDS = frozenset({"divRplyFwdMsg", "appendonsend"})


def _is_quote(tag: Tag) -> bool:
    if tag.name == "blockquote":
        return True
    if tag.name != "div":
        return False
    return tag.get("id") in _QUOTE_DIV_IDS or not _QUOTE_DIV_CLASSES.isdisjoint(tag.get("class") or ())


def _first_quote(soup: BeautifulSoup) -> Tag | None:
    """The first quoted block in document order.  A predicate, not a CSS selector list: one
    walk of the tree instead of soupsieve's matching, a tenth of the cost for each HTML mail."""
    return soup.find(_is_quote)


# A quote header names a date or an address; "I wrote to you last week:" does not.
_WROTE = re.compile(
    r"^(?=.*[\d@<])(?:"
    r"(on|le|am|el)\b.{0,300}\b(wrote|schrieb|a ecrit|a écrit|escribió)\s*:?\s*$"
    r"|(في|بتاريخ|يوم)\s.{0,300}\sكتب(ت)?\b.{0,200}:\s*$"
    r"|.{0,300}\sكتب(ت)?\s*:\s*$"
    r"|كتب(ت)?\s.{0,300}:\s*$)",
    re.IGNORECASE,
)
_SEPARATOR_QUOTE = re.compile(
    r"^[-_=*\s]*(original message|forwarded message|begin forwarded message|"
    r"الرساله الاصليه|رساله معاد توجيهها|الرساله المعاد توجيهها|الرساله المعاده توجيهها|بدايه الرساله المعاد توجيهها|"
    r"رساله محوله|اعاده توجيه|معاد توجيهها|below this line is a copy of the message)[-_=*:.\s]*$",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^\*?(from|من)\s*\*?\s*:", re.IGNORECASE)
_HEADER_OTHER = re.compile(
    r"^\*?(sent|date|to|subject|cc|المرسل|التاريخ|تاريخ الارسال|تم الارسال|ارسلت|ارسل|الي|الموضوع|نسخه)\s*\*?\s*:",
    re.IGNORECASE,
)
_SIG_DASHES = re.compile(r"^--\s?$")
# A client's line names a device or an app and is short; "أرسلت من قبل طلب ..."
# ("I sent a request before ...") is the citizen's own text.
_SIG_MOBILE = re.compile(
    r"^(sent from|get outlook for|sent via|ارسلت من|ارسل من|مرسل من|تم الارسال من|تم ارسالها من)\b"
    r"(?=.{0,40}\b(iphone|ipad|android|samsung|galaxy|huawei|xiaomi|outlook|yahoo|mail|gmail|mobile|phone|"
    r"blackberry|windows|جوال|جوالي|الجوال|هاتف|هاتفي|الهاتف|جهاز|ايفون|الايفون|الاندرويد)\b).{0,60}$",
    re.IGNORECASE,
)


# A closing line ("Regards," / "مع التحية") starts the sender's name, title and
# phone numbers: for the language of a mail, an English company signature under
# Arabic text must not count.
_CLOSING = re.compile(
    r"^(regards|best regards|kind regards|warm regards|best wishes|thanks|thank you|many thanks|"
    r"sincerely|yours sincerely|yours faithfully|yours truly|cheers|respectfully|"
    r"مع التحيه|مع خالص التحيه|مع التقدير|تحياتي|مع الشكر|مع خالص الشكر|شكرا|وشكرا|شكرا لكم|وتقبلوا|"
    r"تقبلوا تحياتي|وتقبلوا تحياتنا|والسلام|اخوكم|اخوك|ابنكم|المخلص|ودمتم)\b[^\n]{0,25}$",
    re.IGNORECASE,
)
_CLOSING_TAIL = 8  # lines after a closing that may still be a signature block


def without_closing(text: str) -> str:
    """``text`` up to and including its closing line, when one ends it; else ``text``."""
    lines = text.split("\n")
    filled = [i for i, line in enumerate(lines) if line.strip()]
    for i in filled[1:]:
        after = sum(1 for j in filled if j > i)
        if after <= _CLOSING_TAIL and _CLOSING.match(normalize_arabic(lines[i]).strip().lower()):
            return "\n".join(lines[:i + 1])
    return text


def split_mail(text: str, html: str | None = None, *, text_from_html: bool = False) -> Split:
    """New text, signature and quoted text of a body.

    With ``text_from_html`` the body was HTML only, so the HTML's own quote markup
    (blockquote, gmail_quote, divRplyFwdMsg) is used before the textual markers.
    """
    quoted_html = ""
    if text_from_html and html:
        marked = html_to_text(html, mark_quote=True)
        text, _, quoted_html = marked.partition(QUOTE_MARK)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = _quote_start(lines)
    if start is None:
        body = [line for line in lines if not line.lstrip().startswith(">")]
        quoted = "\n".join(line for line in lines if line.lstrip().startswith(">"))
    else:
        body, quoted = lines[:start], "\n".join(lines[start:])
    new, signature = _split_signature(body)
    quoted = "\n".join(part for part in (quoted.strip(), quoted_html.strip()) if part)
    return Split(new=new.strip(), signature=signature.strip(), quoted=quoted)


def _quote_start(lines: list[str]) -> int | None:
    normal = [normalize_arabic(line).strip().lower() for line in lines]
    # quoted_after[i], filled_after[i]: ">" lines and non-empty lines from line i on.
    quoted_after, filled_after = [0] * (len(normal) + 1), [0] * (len(normal) + 1)
    for i in range(len(normal) - 1, -1, -1):
        quoted_after[i] = quoted_after[i + 1] + normal[i].startswith(">")
        filled_after[i] = filled_after[i + 1] + bool(normal[i])
    for i, line in enumerate(normal):
        if not line:
            continue
        following = next((n for n in normal[i + 1:i + 3] if n), "")
        if _WROTE.match(line) or _WROTE.match(f"{line} {following}") or _SEPARATOR_QUOTE.match(line):
            return i
        if _HEADER_FROM.match(line) and _has_header_after(normal, i):
            return i
        # From the first ">" line on, the rest is quote when it is mostly ">" lines.
        if line.startswith(">") and quoted_after[i] >= 0.8 * filled_after[i]:
            return i
    return None


def _has_header_after(normal: list[str], start: int) -> bool:
    # Outlook puts "From:" then "Sent:"/"To:"/"Subject:" within a few lines
    # (HTML to text may put each label and value on lines of their own).
    seen = [n for n in normal[start + 1:start + 12] if n][:8]
    return sum(bool(_HEADER_OTHER.match(n)) for n in seen) >= 2


def _split_signature(lines: list[str]) -> tuple[str, str]:
    for i, line in enumerate(lines):
        if _SIG_DASHES.match(line) or _SIG_MOBILE.match(normalize_arabic(line).strip().lower()):
            return "\n".join(lines[:i]), "\n".join(lines[i:])
    return "\n".join(lines), ""
