"""Load and validate ``rules/*.yaml`` into one immutable :class:`Rules`.

Loading returns a whole new ``Rules`` or raises :class:`RulesError`; the caller
keeps the rules in force when it raises.  Every error names file:line:column,
taken from ruamel.yaml's marks, because the reader is an admin with an editor,
not a developer with a traceback.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

log = logging.getLogger(__name__)

Kind = Literal["inquiry", "followup", "clerk_reply", "auto_reply", "bulk", "bounce"]
FALLBACK_DEPARTMENT = "general"


class RulesError(ValueError):
    """The rules cannot be used; each line of the message names file:line:column."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Texts(Strict):
    ar: str
    en: str


class Lines(Strict):
    ar: list[str] = []
    en: list[str] = []


Weekday = Literal["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


class Calendar(Strict):
    """The office's working week: SLAs count these hours only (workhours.py)."""

    working_days: list[Weekday] = Field(default=["sun", "mon", "tue", "wed", "thu"], min_length=1)
    opens: dt.time = dt.time(8)
    closes: dt.time = dt.time(15)
    holidays: list[dt.date] = []  # public holidays, as dates of the office's calendar

    @model_validator(mode="after")
    def _opens_before_closing(self) -> Calendar:
        if self.closes <= self.opens:
            raise ValueError(f"closes ({self.closes:%H:%M}) must be later than opens ({self.opens:%H:%M})")
        return self


class Office(Strict):
    name: Texts
    address: str
    domains: list[str] = []
    signature: Lines = Lines()
    timezone: str = "Asia/Riyadh"  # an IANA zone: every time shown is on this clock
    calendar: Calendar = Calendar()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Asia/Riyadh or Asia/Dubai)") from None
        return value


class Policy(Strict):
    trusted_authserv_ids: list[str] = []
    require_authentication: bool = False
    max_auto_replies_per_day: int = Field(default=5, ge=0)
    # Status changes go to the transaction's applicant e-mails on record; True: to every subscriber.
    notify_subscribers_off_record: bool = False


class Department(Strict):
    id: str
    name: Texts
    aliases: list[str] = []
    queue: str
    clerks: list[str] = []
    escalation: str | None = None
    sla_hours: float = Field(default=24, gt=0)  # working hours of the office's calendar
    round_the_clock: bool = False  # true: the SLA counts every hour, nights and holidays too
    keywords: Lines = Lines()


class Status(Strict):
    id: str
    label: Texts


class Range(Strict):
    min: int
    max: int


class NamedPattern(Strict):
    id: str
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"bad regex {value!r}: {error}") from None
        return value


class TransactionRules(Strict):
    year: Range
    serial_digits: Range
    separators: list[str]
    bare_digits: Range
    cue_words: Lines
    not_after: Lines = Lines()
    not_before: Lines = Lines()
    # SERIAL/YEAR (right-to-left typing) is read as YEAR/SERIAL.
    reversed: bool = True
    # Text that is never a transaction (phones, IBANs, times, the inquiry tag ...),
    # blanked out before numbers are looked for.  Matched case-insensitively
    # against text whose digits are already 0-9.
    ignore: list[NamedPattern] = []


class Match(Strict):
    recipient_alias: bool | None = None
    recipient: list[str] | None = None
    sender: list[str] | None = None
    sender_domain: list[str] | None = None
    keywords: list[str] | None = None
    regex: str | None = None
    language: Literal["ar", "en"] | None = None
    known_transaction: bool | None = None
    kind: list[Kind] | None = None


class RoutingRule(Strict):
    id: str
    match: Match
    department: str | None = None
    priority: Literal["normal", "high"] = "normal"
    tag: str | None = None
    no_auto_reply: bool = False


class Rules(Strict):
    office: Office
    policy: Policy = Policy()
    departments: list[Department]
    statuses: list[Status]
    transactions: TransactionRules
    routing: list[RoutingRule] = []

    def department(self, department_id: str) -> Department:
        for department in self.departments:
            if department.id == department_id:
                return department
        raise KeyError(department_id)

    def status_label(self, status_id: str, language: str) -> str:
        for status in self.statuses:
            if status.id == status_id:
                return getattr(status.label, language)
        return status_id

    def department_ids(self) -> list[str]:
        return [department.id for department in self.departments]

    def status_ids(self) -> list[str]:
        return [status.id for status in self.statuses]

    def alias_department(self, address: str) -> str | None:
        """The department whose public alias ``address`` is (case-insensitive), if any."""
        address = address.lower()
        for department in self.departments:
            if address in (alias.lower() for alias in department.aliases):
                return department.id
        return None

    def clerk_department(self, address: str | None) -> str | None:
        address = (address or "").lower()
        for department in self.departments:
            if address and address in (clerk.lower() for clerk in department.clerks):
                return department.id
        return None


@dataclass
class _Sources:
    """Where each top-level section was read from, to turn a pydantic loc into file:line:col."""

    folder: Path
    sections: dict[str, tuple[Path, CommentedMap]] = field(default_factory=dict)

    def where(self, loc: tuple[Any, ...], key: bool = False) -> str:
        """file:line:col of the node at ``loc`` (of its key when ``key``), or of the nearest parent."""
        if not loc or loc[0] not in self.sections:
            return str(self.folder)
        path, node = self.sections[loc[0]]
        position = node.lc.key(loc[0])
        key_position = position
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                key_position = node.lc.key(part)
                position = node.lc.value(part)
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                position = key_position = node.lc.item(part)
                node = node[part]
            else:
                break
        line, column = key_position if key else position
        return f"{path}:{line + 1}:{column + 1}"


def _read_yaml(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    # YAML forbids tabs in indentation; ruamel's own message for it is cryptic.
    for number, line in enumerate(text.splitlines(), start=1):
        if "\t" in line:
            raise RulesError([f"{path}:{number}:{line.index(chr(9)) + 1}: tab character (indent with spaces)"])
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(error.problem or error.context).split())
        if error.context and error.problem:
            problem = f"{' '.join(error.context.split())}: {problem}"
        raise RulesError([f"{where}: YAML syntax: {problem}"]) from None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` (for 'expected ...' lists)."""
    model: type[BaseModel] = Rules
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        inner = _inner_model(info.annotation) if info else None
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for argument in typing.get_args(annotation):
            found = _inner_model(argument)
            if found is not None:
                return found
    return None


def _describe(error: Any, sources: _Sources) -> str:
    loc = tuple(error["loc"])
    name = loc[-1] if loc else ""
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        expected = ", ".join(model.model_fields) if model else "?"
        close = difflib.get_close_matches(str(name), list(model.model_fields) if model else [], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{sources.where(loc, key=True)}: unknown key '{name}' ({hint}expected {expected})"
    if error["type"] == "missing":
        if len(loc) == 1:
            return f"{sources.folder}: missing section '{name}' (add it to one of the rules files)"
        return f"{sources.where(loc[:-1])}: missing required key '{name}'"
    path = ".".join(str(part) for part in loc)
    return f"{sources.where(loc)}: {path}: {error['msg']} (got {error['input']!r})"


def _read_folder(folder: Path) -> tuple[dict[str, Any], _Sources]:
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise RulesError([f"{folder}: no rules files (*.yaml) found"])
    merged: dict[str, Any] = {}
    sources = _Sources(folder)
    errors: list[str] = []
    for path in files:
        try:
            data = _read_yaml(path)
        except RulesError as error:
            errors.extend(error.errors)
            continue
        if data is None:
            continue
        if not isinstance(data, CommentedMap):
            errors.append(f"{path}:1:1: expected a mapping of sections (office:, departments:, ...) at the top")
            continue
        for key, value in data.items():
            if key in merged:
                first = sources.where((key,), key=True)
                line, column = data.lc.key(key)
                errors.append(f"{path}:{line + 1}:{column + 1}: section '{key}' is already defined at {first}")
                continue
            merged[key] = value
            sources.sections[key] = (path, data)
    if errors:
        raise RulesError(errors)
    return merged, sources


def _duplicates(items: list[Any], section: str, sources: _Sources, what: str) -> list[str]:
    errors: list[str] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in seen:
            first = sources.where((section, seen[item.id], "id"))
            errors.append(f"{sources.where((section, index, 'id'))}: duplicate {what} id '{item.id}' (first at {first})")
        else:
            seen[item.id] = index
    return errors


def _cross_check(rules: Rules, sources: _Sources) -> list[str]:
    errors = _duplicates(rules.departments, "departments", sources, "department")
    errors += _duplicates(rules.statuses, "statuses", sources, "status")
    errors += _duplicates(rules.routing, "routing", sources, "rule")
    departments = rules.department_ids()
    if FALLBACK_DEPARTMENT not in departments:
        errors.append(f"{sources.where(('departments',))}: department '{FALLBACK_DEPARTMENT}' is required (the fallback queue)")
    owners: dict[str, str] = {}
    for index, department in enumerate(rules.departments):
        for number, alias in enumerate(department.aliases):
            owner = owners.setdefault(alias.lower(), department.id)
            if owner != department.id:
                errors.append(f"{sources.where(('departments', index, 'aliases', number))}: alias '{alias}' already belongs to department '{owner}'")
    for index, rule in enumerate(rules.routing):
        loc = ("routing", index)
        if rule.department is not None and rule.department not in departments:
            errors.append(f"{sources.where(loc + ('department',))}: unknown department '{rule.department}' (expected {', '.join(departments)})")
        if rule.department is None and not rule.match.recipient_alias:
            errors.append(f"{sources.where(loc)}: rule '{rule.id}' needs a department (or match: recipient_alias: true)")
        if not rule.match.model_fields_set:
            errors.append(f"{sources.where(loc + ('match',))}: rule '{rule.id}' has no conditions under match")
        if rule.match.regex is not None:
            try:
                re.compile(rule.match.regex)
            except re.error as error:
                errors.append(f"{sources.where(loc + ('match', 'regex'))}: bad regex {rule.match.regex!r}: {error}")
    return errors


def load_rules(folder: Path | str) -> Rules:
    """Read every ``*.yaml`` in ``folder`` (each top-level section in one file only) and validate."""
    folder = Path(folder)
    merged, sources = _read_folder(folder)
    try:
        rules = Rules.model_validate(merged)
    except ValidationError as error:
        raise RulesError([_describe(item, sources) for item in error.errors()]) from None
    errors = _cross_check(rules, sources)
    if errors:
        raise RulesError(errors)
    return rules


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class RulesReloader:
    """Keeps the rules in force and swaps in new ones when the files change and validate.

    Call :meth:`reload_if_changed` every couple of seconds.  Contents, not mtimes,
    are compared: an editor saving twice within one mtime tick must not be missed.
    """

    def __init__(self, folder: Path | str, rules: Rules | None = None) -> None:
        """``rules``: the rules a running daemon has in force (a restarted worker takes them, even
        while the files are mid-edit and broken); the files are then read at the first check."""
        self.folder = Path(folder)
        self.refused: list[str] = []  # the errors of the last refused reload; empty once one succeeds
        if rules is None:
            self._seen: object = _fingerprint(self.folder)
            self.rules = load_rules(self.folder)
        else:
            self._seen = None
            self.rules = rules

    def reload_if_changed(self) -> Rules:
        fingerprint = _fingerprint(self.folder)
        if fingerprint == self._seen:
            return self.rules
        self._seen = fingerprint
        try:
            self.rules = load_rules(self.folder)
        except RulesError as error:
            log.error("rules_dir=%s reload refused, rules in force kept: %s", self.folder, "; ".join(error.errors))
            self.refused = error.errors
            return self.rules
        self.refused = []
        log.info("rules_dir=%s reloaded departments=%d routing_rules=%d", self.folder, len(self.rules.departments), len(self.rules.routing))
        return self.rules
