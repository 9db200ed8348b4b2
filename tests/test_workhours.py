"""workhours.py: the SLA counts the office's working hours, on its clock."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbot import reply, workhours
from mailbot.rules import Calendar, Rules, RulesError, load_rules
from mailbot.settings import SHIPPED_RULES, SHIPPED_TEMPLATES

RIYADH = ZoneInfo("Asia/Riyadh")
WEEK = Calendar()  # Sunday to Thursday, 08:00-15:00
# A month's end with a holiday on a Thursday and one on a Sunday.
HOLIDAYS = Calendar(holidays=[date(2026, 12, 31), date(2027, 1, 3)])


def at(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=RIYADH)


def test_thursday_afternoon_with_24_working_hours_is_due_the_next_wednesday_at_ten(rules: Rules):
    arrived = at(2026, 12, 10, 14)  # a Thursday
    assert arrived.strftime("%A") == "Thursday"
    due = workhours.due_at(rules.department("rights"), arrived, rules)
    assert due.astimezone(RIYADH) == at(2026, 12, 16, 10)
    assert due.astimezone(RIYADH).strftime("%A") == "Wednesday"


@pytest.mark.parametrize(("arrived", "hours", "due"), [
    (at(2026, 12, 11, 9), 1, at(2026, 12, 13, 9)),  # Friday: the clock starts on Sunday morning
    (at(2026, 12, 13, 6), 7, at(2026, 12, 13, 15)),  # before opening; due exactly at closing, the same day
    (at(2026, 12, 13, 15), 1, at(2026, 12, 14, 9)),  # at closing: nothing left today
    (at(2026, 12, 30, 14), 2, at(2027, 1, 4, 9)),  # month's and year's end, over two holidays and a weekend
])
def test_due_times_across_evenings_weekends_and_holidays(arrived: datetime, hours: float, due: datetime):
    assert workhours.add_working_hours(arrived, hours, HOLIDAYS, RIYADH).astimezone(RIYADH) == due


def test_a_round_the_clock_department_counts_every_hour(tmp_path: Path):
    folder = tmp_path / "rules"
    folder.mkdir()
    for path in Path(SHIPPED_RULES).glob("*.yaml"):
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    departments = folder / "departments.yaml"
    text = departments.read_text(encoding="utf-8")
    departments.write_text(text.replace("sla_hours: 24", "sla_hours: 24\n    round_the_clock: true", 1),
                           encoding="utf-8")
    rules = load_rules(folder)
    [always] = [d for d in rules.departments if d.round_the_clock]
    arrived = at(2026, 12, 10, 14)
    assert workhours.due_at(always, arrived, rules) == arrived + timedelta(hours=24)


instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31),
                        timezones=st.just(timezone.utc))
durations = st.floats(min_value=0.25, max_value=200).map(lambda hours: round(hours * 4) / 4)


@settings(max_examples=300, deadline=None)
@given(arrived=instants, hours=durations)
def test_the_working_time_between_arrival_and_due_is_the_sla(arrived: datetime, hours: float):
    due = workhours.add_working_hours(arrived, hours, HOLIDAYS, RIYADH)
    assert due >= arrived
    assert workhours.working_time_between(arrived, due, HOLIDAYS, RIYADH) == timedelta(hours=hours)
    local_due = due.astimezone(RIYADH)
    # Due inside working hours of a working day (closing time included), never in an evening or a holiday.
    assert workhours.is_working_day(local_due.date(), HOLIDAYS)
    assert time(8) < local_due.time() <= time(15)


@settings(max_examples=200, deadline=None)
@given(first=instants, gap=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20)), hours=durations)
def test_a_later_arrival_is_never_due_earlier(first: datetime, gap: timedelta, hours: float):
    earlier = workhours.add_working_hours(first, hours, HOLIDAYS, RIYADH)
    assert workhours.add_working_hours(first + gap, hours, HOLIDAYS, RIYADH) >= earlier


def test_the_acknowledgement_states_the_due_time_on_the_office_clock(rules: Rules):
    due = workhours.due_at(rules.department("rights"), at(2026, 12, 10, 14), rules)
    context = {"inquiry": 7, "department": "rights", "due_at": due, "now": at(2026, 12, 10, 14)}
    ar = reply.render("ack_no_number", "ar", context, rules, SHIPPED_TEMPLATES)
    en = reply.render("ack_no_number", "en", context, rules, SHIPPED_TEMPLATES)
    assert "within 24 working hours, that is before 16 December 2026" in en.text
    assert "10:00 Riyadh time" in en.text
    assert "خلال ٢٤ ساعة عمل" in ar.text and "١٠:٠٠ بتوقيت الرياض" in ar.text


@pytest.mark.parametrize(("edit", "error"), [
    ("timezone: Asia/Riyadh", "timezone: Asia/Ryadh"),
    ('closes: "15:00"', 'closes: "07:00"'),
    ("working_days: [sun, mon, tue, wed, thu]", "working_days: [sun, mon, tue, wed, thr]"),
])
def test_a_bad_calendar_is_refused_with_its_place(tmp_path: Path, edit: str, error: str):
    folder = tmp_path / "rules"
    folder.mkdir()
    for path in Path(SHIPPED_RULES).glob("*.yaml"):
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    office = folder / "office.yaml"
    office.write_text(office.read_text(encoding="utf-8").replace(edit, error), encoding="utf-8")
    with pytest.raises(RulesError) as refused:
        load_rules(folder)
    message = str(refused.value)
    assert f"{office}:" in message
    assert ("unknown time zone 'Asia/Ryadh'" in message or "must be later than opens" in message
            or "'thr'" in message), message
