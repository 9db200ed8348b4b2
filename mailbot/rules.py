"""Load and validate ``rules/*.yaml`` into one immutable :class:`Rules`.

Loading returns a whole new ``Rules`` or raises :class:`RulesError`; the caller
keeps the rules in force when it raises.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError


class RulesError(ValueError):
    """The rules cannot be used; the message names file:line:column."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Texts(Strict):
    ar: str
    en: str


class Lines(Strict):
    ar: list[str] = []
    en: list[str] = []


class Office(Strict):
    name: Texts
    address: str
    domains: list[str] = []
    signature: Lines = Lines()


class Policy(Strict):
    trusted_authserv_ids: list[str] = []
    require_authentication: bool = False
    max_auto_replies_per_day: int = Field(default=5, ge=0)


class Department(Strict):
    id: str
    name: Texts
    aliases: list[str] = []
    queue: str
    clerks: list[str] = []
    escalation: str | None = None
    sla_hours: float = Field(default=24, gt=0)
    keywords: Lines = Lines()


class Status(Strict):
    id: str
    label: Texts


class Range(Strict):
    min: int
    max: int


class TransactionRules(Strict):
    year: Range
    serial_digits: Range
    separators: list[str]
    bare_digits: Range
    cue_words: Lines
    not_after: Lines = Lines()


class Match(Strict):
    recipient_alias: bool | None = None
    recipient: list[str] | None = None
    sender: list[str] | None = None
    sender_domain: list[str] | None = None
    keywords: list[str] | None = None
    regex: str | None = None
    language: Literal["ar", "en"] | None = None
    known_transaction: bool | None = None
    kind: list[str] | None = None


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


def _read_yaml(path: Path) -> Any:
    yaml = YAML(typ="rt")
    try:
        return yaml.load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RulesError(f"{where}: {error.problem or error.context}") from None


def load_rules(folder: Path) -> Rules:
    """Read every ``*.yaml`` in ``folder`` (each top-level key in one file only) and validate."""
    merged: dict[str, Any] = {}
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise RulesError(f"{folder}: no rules files (*.yaml) found")
    for path in files:
        data = _read_yaml(path)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise RulesError(f"{path}:1:1: expected a mapping of sections at the top")
        for key, value in data.items():
            if key in merged:
                raise RulesError(f"{path}: section {key!r} is defined in more than one file")
            merged[key] = value
    try:
        rules = Rules.model_validate(merged)
    except ValidationError as error:
        first = error.errors()[0]
        raise RulesError(f"{folder}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    for rule in rules.routing:
        if rule.match.regex:
            try:
                re.compile(rule.match.regex)
            except re.error as error:
                raise RulesError(f"rule {rule.id}: bad regex: {error}") from None
    return rules
