"""Transaction numbers: every written form the SPEC names, and what is never a transaction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailbot.extract import CUE_BARE, SERIAL_YEAR, YEAR_SERIAL, extract_all, extract_transactions
from mailbot.rules import Rules, load_rules
from mailbot.settings import SHIPPED_RULES

RULES = load_rules(SHIPPED_RULES)
T = RULES.transactions

WESTERN = "0123456789"
ARABIC_INDIC = "٠١٢٣٤٥٦٧٨٩"
PERSIAN = "۰۱۲۳۴۵۶۷۸۹"
SCRIPTS = (WESTERN, ARABIC_INDIC, PERSIAN)


def numbers(text: str) -> list[str]:
    return [found.number for found in extract_transactions(text, T, "new")]


@pytest.mark.parametrize(
    ("text", "expected", "pattern"),
    [
        ("أبغى أعرف وش صار على المعاملة رقم 1446/00321", "1446/00321", YEAR_SERIAL),
        ("حالة رقم المعاملة ١٤٤٦/١٢٣٤٥٦ الخاصة بطلب زيارة", "1446/123456", YEAR_SERIAL),
        ("رقم المعاملة ۱۴۴۵/۸۸۲۱۷ متى أستلم؟", "1445/88217", YEAR_SERIAL),
        ("والمعاملة رقمها 1446/٣١٠٠٧ ولا جاني رد", "1446/31007", YEAR_SERIAL),
        ("معاملتي رقم 9031/1445 انرفضت", "1445/9031", SERIAL_YEAR),
        ("المعاملة 1446-7789 وصورة", "1446/7789", YEAR_SERIAL),
        ("رقم المعاملة 1446\\240015 ، وكذلك", "1446/240015", YEAR_SERIAL),
        ("following up on transaction 1446_12345.", "1446/12345", YEAR_SERIAL),
        ("المعاملة 1446.44120 الخاصة", "1446/44120", YEAR_SERIAL),
        ("في المعاملة 1446 90210 عشان", "1446/90210", YEAR_SERIAL),
        ("My transaction number is 1446–18830.", "1446/18830", YEAR_SERIAL),
        ("برقم المعاملة 1446—5521 ، أرجو", "1446/5521", YEAR_SERIAL),
        ("بموجب المعاملة ١٤٤٦،٠٠٤٥١٢٠ ، ونأمل", "1446/0045120", YEAR_SERIAL),
        ("ورقم المعاملة 144677120 ، متى يجيني الموعد؟", "1446/77120", CUE_BARE),
        ("Transaction No.144612345 - could you confirm", "1446/12345", CUE_BARE),
        ("رقم الطلب ١٤٤٥٨٨٢١٧ لو سمحت", "1445/88217", CUE_BARE),
        ("Please check ref 1445-70001 today", "1445/70001", YEAR_SERIAL),
        ("and also #1446/44120 which", "1446/44120", YEAR_SERIAL),
        ("المعاملة 1446 / 12345 لو سمحت", "1446/12345", YEAR_SERIAL),
        ("المعاملة ‏1446‏/‏12345‏ لو سمحت", "1446/12345", YEAR_SERIAL),  # RLM marks from RTL editors
        ("the number 1446\u00a0/\u00a012345 from HTML", "1446/12345", YEAR_SERIAL),
        ("reversed with Arabic comma ١٢٣٤٥،١٤٤٦ please", "1446/12345", SERIAL_YEAR),
    ],
)
def test_each_written_form_canonicalises(text: str, expected: str, pattern: str) -> None:
    [found] = extract_transactions(text, T, "new")
    assert (found.number, found.pattern, found.where) == (expected, pattern, "new")
    assert found.written.replace("\u200f", "") in text.replace("\u200f", "")


def test_written_keeps_the_citizens_digits() -> None:
    [found] = extract_transactions("رقم المعاملة ١٤٤٦/٠٠٣٢١", T, "subject")
    assert found.written == "١٤٤٦/٠٠٣٢١"
    assert found.number == "1446/00321"


def test_leading_zeros_are_kept() -> None:
    assert numbers("المعاملة 1446/0045120") == ["1446/0045120"]


def test_line_break_is_never_a_separator() -> None:
    assert numbers("المعاملة 1446\n12345") == []
    assert numbers("المعاملة 1446/\n12345") == []


def test_bare_digits_need_a_cue() -> None:
    assert numbers("وصلني الرقم 144612345 أمس") == []
    assert numbers("رقم المعاملة 144612345") == ["1446/12345"]


def test_bare_digits_outside_the_configured_lengths_are_ignored() -> None:
    assert numbers("رقم المعاملة 1446123") == []  # 7 digits: too short
    assert numbers("رقم المعاملة 1446123456789") == []  # 13 digits: too long


def test_list_of_numbers_in_order() -> None:
    text = "عندي ثلاث معاملات:\n1- 1446/99881\n2- 1444/66390\n3- 1446/00321"
    assert numbers(text) == ["1446/99881", "1444/66390", "1446/00321"]


def test_numbers_separated_by_spaces_or_commas_are_two_numbers() -> None:
    assert numbers("1446/12345 1445/5555") == ["1446/12345", "1445/5555"]
    assert numbers("المعاملات 1446/12345، 1445/5555") == ["1446/12345", "1445/5555"]


@pytest.mark.parametrize(
    "text",
    [
        "جوالي 0551446789",
        "جوالي 055 144 6789",
        "call +966 55 144 6789 or +966551446789",
        "أو 00966551446789",
        "Office: 011 218 4400",
        "رقم هويتي 1098765432",
        "رقم هويته 1448203317",
        "إقامة رقم 2456789013",
        "My iqama is 2398765410.",
        "ID: 1446123456",
        "بتاريخ 1446/03/12 هـ",
        "راجع بعد 12/03/1446",
        "وراجعت يوم ١٤٤٦/٠٥/٢٠",
        "on 2025-01-30 at 14:46",
        "الساعة 10:30 مساءً",
        "transferred SAR 12,500 plus 1500 ريال fees",
        "المبلغ 1446.5000 ريال",
        "IBAN SA44 2000 0001 2345 6789 1234",
        "IBAN SA4420000001234567891234",
        "P.O. Box 14461, Riyadh 12214",
        "ص.ب 1446 11564",
        "مرجعكم [INQ-000123] و INQ-1446123",
        "سجل تجاري 1010456789 - هاتف 0112345678",
        "write to ahmed1446.12345@sahab.example please",
        "عن العام الدراسي 1445-1446",
    ],
)
def test_not_transactions(text: str) -> None:
    assert numbers(text) == []


def test_years_outside_the_range_are_not_transactions() -> None:
    assert numbers("المعاملة 1399/12345 و 1500/12345 و 2025/12345") == []


def test_extract_all_orders_by_section_and_reports_each_number_once() -> None:
    found = extract_all(
        [
            ("subject", "استفسار عن المعاملة 1446/12345"),
            ("new", "المعاملة ١٤٤٦/١٢٣٤٥ والمعاملة 1445/9031"),
            ("signature", "جوال 0551234567"),
            ("quoted", "> 1446/00321\n> 1445/9031"),
        ],
        T,
    )
    assert [(f.number, f.where) for f in found] == [
        ("1446/12345", "subject"), ("1445/9031", "new"), ("1446/00321", "quoted"),
    ]


def test_patterns_come_from_the_rules(tmp_path: Path) -> None:
    # Another office: Gregorian years and 6-digit serials, "file no" as a cue, no reversal.
    folder = tmp_path / "rules"
    folder.mkdir()
    for path in SHIPPED_RULES.glob("*.yaml"):
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "transactions.yaml").write_text(
        "transactions:\n"
        "  year: {min: 2000, max: 2099}\n"
        "  serial_digits: {min: 6, max: 6}\n"
        "  separators: ['/']\n"
        "  reversed: false\n"
        "  bare_digits: {min: 10, max: 10}\n"
        "  cue_words: {ar: [], en: [file no]}\n",
        encoding="utf-8",
    )
    other: Rules = load_rules(folder)
    text = "file no 2025123456, also 2024/654321 and 654321/2024 and 1446/12345"
    assert [f.number for f in extract_transactions(text, other.transactions, "new")] == [
        "2025/123456", "2024/654321",
    ]


def test_a_bad_ignore_regex_is_refused_at_load(tmp_path: Path) -> None:
    from mailbot.rules import RulesError

    folder = tmp_path / "rules"
    folder.mkdir()
    for path in SHIPPED_RULES.glob("*.yaml"):
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    text = (folder / "transactions.yaml").read_text(encoding="utf-8")
    (folder / "transactions.yaml").write_text(text.replace("'\\[?\\bINQ-\\d+\\]?'", "'[unclosed'"),
                                              encoding="utf-8")
    with pytest.raises(RulesError, match=r"transactions\.yaml:\d+:\d+: .*bad regex '\[unclosed'"):
        load_rules(folder)


# --- properties -------------------------------------------------------------------------------

def write(digits: str, scripts: list[str]) -> str:
    return "".join(scripts[i % len(scripts)][int(d)] for i, d in enumerate(digits))


script_mix = st.lists(st.sampled_from(SCRIPTS), min_size=1, max_size=3)
years = st.integers(T.year.min, T.year.max).map(str)
serials = st.integers(T.serial_digits.min, T.serial_digits.max).flatmap(
    lambda n: st.text(WESTERN, min_size=n, max_size=n))
separators = st.sampled_from(T.separators)
contexts = st.sampled_from([
    ("المعاملة رقم ", " لو سمحت"), ("Transaction No. ", "."), ("", ""), ("(", ")"),
    ("أبغى أعرف حالة ", "، وشكراً"), ("ref: ", " thanks"),
])


@settings(max_examples=300, deadline=None)
@given(years, serials, separators, script_mix, st.booleans(), contexts, st.booleans())
def test_any_valid_number_canonicalises(year: str, serial: str, separator: str, scripts: list[str],
                                        reverse: bool, context: tuple[str, str], spaced: bool) -> None:
    gap = f" {separator} " if spaced and separator != " " else separator
    # Some pairs are phone numbers as much as transactions ("009…", "010000-1400" a Riyadh
    # landline, "8000-1400" a toll-free number): the rules' ignore patterns rightly take them.
    first, second = (serial, year) if reverse else (year, serial)
    assume(not any(re.search(p.regex, first + gap + second) for p in T.ignore))
    written = write(first, scripts) + gap + write(second, scripts)
    text = context[0] + written + context[1]
    found = extract_transactions(text, T, "new")
    expected = f"{year}/{serial}"
    if len(serial) == 4 and T.year.min <= int(serial) <= T.year.max:
        if abs(int(serial) - int(year)) == 1 and int(first) + 1 == int(second):
            assert found == []  # reads as a span of years
            return
        if reverse:
            expected = f"{serial}/{year}"  # both halves look like a year: read as written
    assert [f.number for f in found] == [expected]
    assert found[0].written == written


@settings(max_examples=200, deadline=None)
@given(years, serials, script_mix, st.sampled_from(T.cue_words.ar + ["Transaction No.", "transaction number:"]))
def test_bare_digits_after_a_cue_canonicalise(year: str, serial: str, scripts: list[str], cue: str) -> None:
    text = f"{cue} {write(year + serial, scripts)}"
    assert numbers(text) == [f"{year}/{serial}"]


digit = st.integers(0, 9).map(str)


def digits(n: int) -> st.SearchStrategy[str]:
    return st.lists(digit, min_size=n, max_size=n).map("".join)


def spaced(groups: list[str], sep: str) -> str:
    return sep.join(groups)


mobiles = digits(8).flatmap(lambda rest: st.sampled_from([
    f"05{rest}", f"05{rest[0]} {rest[1:4]} {rest[4:]}", f"05{rest[0]}-{rest[1:4]}-{rest[4:]}",
    f"+9665{rest}", f"+966 5{rest[0]} {rest[1:4]} {rest[4:]}", f"009665{rest}", f"00966 5{rest}",
    f"+966-5{rest[0]}-{rest[1:4]}-{rest[4:]}",
]))
ids = st.tuples(st.sampled_from("12"), digits(9)).map("".join)
id_contexts = st.sampled_from(
    ["رقم الهوية ", "هويتي ", "سجل مدني رقم ", "إقامة ", "ID ", "iqama no. ", "", "national ID: "])
date_separators = st.sampled_from(["/", "-", ".", "\\"])
dates = st.one_of(
    st.tuples(years, st.integers(1, 12), st.integers(1, 30), date_separators).map(
        lambda t: f"{t[0]}{t[3]}{t[1]:02d}{t[3]}{t[2]:02d}"),
    st.tuples(years, st.integers(1, 12), st.integers(1, 30), date_separators).map(
        lambda t: f"{t[2]}{t[3]}{t[1]}{t[3]}{t[0]}"),
    st.tuples(st.integers(2000, 2099), st.integers(1, 12), st.integers(1, 31)).map(
        lambda t: f"{t[0]}-{t[1]:02d}-{t[2]:02d}"),
)


@settings(max_examples=300, deadline=None)
@given(mobiles, script_mix, st.sampled_from(["جوالي ", "call me on ", "", "رقمي "]))
def test_phones_are_never_transactions(phone: str, scripts: list[str], before: str) -> None:
    written = "".join(write(c, scripts) if c.isdigit() else c for c in phone)
    assert numbers(f"{before}{written} شكراً") == []


@settings(max_examples=300, deadline=None)
@given(ids, script_mix, id_contexts)
def test_ids_are_never_transactions(number: str, scripts: list[str], before: str) -> None:
    assert numbers(f"{before}{write(number, scripts)} والسلام") == []


@settings(max_examples=300, deadline=None)
@given(dates, script_mix, st.sampled_from(["بتاريخ ", "on ", "", "يوم "]))
def test_dates_are_never_transactions(date: str, scripts: list[str], before: str) -> None:
    written = "".join(write(c, scripts) if c.isdigit() else c for c in date)
    assert numbers(f"{before}{written} هـ") == []
    assert numbers(f"{before}{written}") == []


def test_a_flood_of_numbers_is_read_only_so_far() -> None:
    from mailbot.extract import MAX_FOUND

    text = " ".join(f"1446/{10000 + i}" for i in range(5 * MAX_FOUND))
    found = extract_transactions(text, T, "new")
    assert len(found) == MAX_FOUND
    assert found[-1].number == f"1446/{10000 + MAX_FOUND - 1}"
