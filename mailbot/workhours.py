"""The office's clock: its time zone, working days and hours, and when an inquiry is due.

An SLA of ``sla_hours`` counts working hours of the office's calendar (rules
``office.calendar``): an inquiry that arrives on Thursday at 14:00, with Sunday to
Thursday 08:00-15:00 and 24 working hours, is due the following Wednesday at 10:00.
Time outside working hours — evenings, the weekend, public holidays — does not count;
a department with ``round_the_clock: true`` counts every hour.  Pure functions: the
arrival time comes in, the due time goes out, both aware; arithmetic is done in UTC so a
zone that changes its offset counts real hours.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from mailbot.rules import Calendar, Department, Rules

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # date.weekday() order


def zone(rules: Rules) -> ZoneInfo:
    return ZoneInfo(rules.office.timezone)


def local(value: datetime, rules: Rules) -> datetime:
    """``value`` on the office's clock."""
    return value.astimezone(zone(rules))


def stamp(value: datetime, rules: Rules) -> str:
    """A time for the CLI: on the office's clock, the zone named (2026-12-10 14:00 Asia/Riyadh)."""
    return f"{local(value, rules):%Y-%m-%d %H:%M} {rules.office.timezone}"


def is_working_day(day: date, calendar: Calendar) -> bool:
    return WEEKDAYS[day.weekday()] in calendar.working_days and day not in calendar.holidays


def add_working_hours(start: datetime, hours: float, calendar: Calendar, tz: ZoneInfo) -> datetime:
    """The moment ``hours`` working hours after ``start`` (aware), in UTC.

    A due time that falls exactly at closing stays on that day (15:00, not the next
    morning's 08:00).  ``calendar`` has at least one working day (the rules check it), so
    the walk ends; it visits one day per iteration.
    """
    remaining = timedelta(hours=hours)
    moment = start.astimezone(timezone.utc)
    day = start.astimezone(tz).date()
    while True:
        if is_working_day(day, calendar):
            opens = datetime.combine(day, calendar.opens, tz).astimezone(timezone.utc)
            closes = datetime.combine(day, calendar.closes, tz).astimezone(timezone.utc)
            begin = max(moment, opens)
            if begin < closes:
                if remaining <= closes - begin:
                    return begin + remaining
                remaining -= closes - begin
        day += timedelta(days=1)
        moment = datetime.combine(day, time(0), tz).astimezone(timezone.utc)


def working_time_between(start: datetime, end: datetime, calendar: Calendar, tz: ZoneInfo) -> timedelta:
    """Working time from ``start`` to ``end`` (negative when ``end`` is earlier): what an SLA has left."""
    if end < start:
        return -working_time_between(end, start, calendar, tz)
    total = timedelta()
    day, last = start.astimezone(tz).date(), end.astimezone(tz).date()
    while day <= last:
        if is_working_day(day, calendar):
            opens = datetime.combine(day, calendar.opens, tz)
            closes = datetime.combine(day, calendar.closes, tz)
            begin, finish = max(start, opens), min(end, closes)
            if begin < finish:
                total += finish.astimezone(timezone.utc) - begin.astimezone(timezone.utc)
        day += timedelta(days=1)
    return total


def due_at(department: Department, arrived: datetime, rules: Rules) -> datetime:
    """When the office promised an answer to a mail for ``department`` that arrived at ``arrived``."""
    if department.round_the_clock:
        return arrived + timedelta(hours=department.sla_hours)
    return add_working_hours(arrived, department.sla_hours, rules.office.calendar, zone(rules))
