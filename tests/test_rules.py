"""rules.py: every mistake an admin can make is named by file:line:column; hot reload keeps good rules."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from textwrap import dedent

import pytest
from click.testing import CliRunner

from mailbot.cli import cli
from mailbot.rules import Rules, RulesError, RulesReloader, load_rules
from mailbot.settings import SHIPPED_RULES


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the shipped rules an admin can break."""
    target = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, target)
    return target


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(folder: Path) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(folder)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def test_shipped_rules_load_and_describe_the_office(rules: Rules) -> None:
    assert rules.office.address == "inquiries@emirate.example"
    assert rules.department_ids() == ["rights", "prisons", "criminal", "statements", "governorates", "completion",
                                      "general"]
    assert rules.status_ids() == ["received", "under_review", "awaiting_documents", "forwarded", "completed",
                                  "rejected"]
    assert rules.status_label("forwarded", "ar") == "أحيلت إلى الجهة المختصة"
    assert rules.alias_department("Prisons@Emirate.example") == "prisons"
    assert rules.clerk_department("m.alzahrani@emirate.example") == "criminal"
    assert rules.policy.trusted_authserv_ids == ["mx.emirate.example"]
    assert [rule.id for rule in rules.routing] == ["department-alias"]


def test_unknown_key_names_its_position_and_the_expected_keys(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: department-alias
            match:
              recipient_alias: true
          - id: courts
            match:
              sender_domain: [court.example]
            departmnt: rights
        """)
    assert errors_of(folder) == [
        f"{path}:8:5: unknown key 'departmnt' (did you mean 'department'? "
        "expected id, match, department, priority, tag, no_auto_reply)"
    ]


def test_unknown_key_inside_match(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: courts
            match: {sender_domian: [court.example]}
            department: rights
        """)
    [error] = errors_of(folder)
    assert error.startswith(f"{path}:3:13: unknown key 'sender_domian' (did you mean 'sender_domain'? expected "
                            "recipient_alias, recipient, sender, sender_domain, keywords, regex, language,")


def test_unknown_department_in_a_rule(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: courts
            match:
              sender_domain: [court.example]
            department: prisns
        """)
    assert errors_of(folder) == [
        f"{path}:5:17: unknown department 'prisns' (expected rights, prisons, criminal, statements, "
        "governorates, completion, general)"
    ]


def test_bad_regex(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: urgent
            match:
              regex: '(urgent|عاجل'
            department: general
        """)
    assert errors_of(folder) == [
        f"{path}:4:14: bad regex '(urgent|عاجل': missing ), unterminated subpattern at position 0"
    ]


def test_tab_character(folder: Path) -> None:
    path = folder / "routing.yaml"
    path.write_text("routing:\n  - id: x\n\tmatch: {}\n", encoding="utf-8")
    assert errors_of(folder) == [f"{path}:3:1: tab character (indent with spaces)"]


def test_duplicate_ids(folder: Path) -> None:
    path = write(folder, "statuses.yaml", """
        statuses:
          - id: received
            label: {ar: تم الاستلام, en: Received}
          - id: under_review
            label: {ar: قيد الدراسة, en: Under review}
          - id: received
            label: {ar: وصلت, en: Arrived}
        """)
    assert errors_of(folder) == [f"{path}:6:9: duplicate status id 'received' (first at {path}:2:9)"]


def test_wrong_type(folder: Path) -> None:
    text = (folder / "departments.yaml").read_text(encoding="utf-8")
    (folder / "departments.yaml").write_text(text.replace("sla_hours: 24", "sla_hours: a day", 1), encoding="utf-8")
    line = text.splitlines().index("    sla_hours: 24") + 1
    assert errors_of(folder) == [
        f"{folder / 'departments.yaml'}:{line}:16: departments.0.sla_hours: Input should be a valid number, "
        "unable to parse string as a number (got 'a day')"
    ]


def test_missing_required_key(folder: Path) -> None:
    path = write(folder, "statuses.yaml", """
        statuses:
          - id: received
            label: {ar: تم الاستلام}
        """)
    assert errors_of(folder) == [f"{path}:3:12: missing required key 'en'"]


def test_missing_section_and_missing_fallback_department(folder: Path) -> None:
    (folder / "statuses.yaml").unlink()
    assert errors_of(folder) == [f"{folder}: missing section 'statuses' (add it to one of the rules files)"]


def test_general_department_is_required(folder: Path) -> None:
    text = (folder / "departments.yaml").read_text(encoding="utf-8")
    (folder / "departments.yaml").write_text(text[:text.index("  - id: general")], encoding="utf-8")
    line = text.splitlines().index("departments:") + 1
    assert errors_of(folder) == [
        f"{folder / 'departments.yaml'}:{line + 1}:3: department 'general' is required (the fallback queue)"
    ]


def test_rule_without_department(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: arabic
            match: {language: ar}
        """)
    assert errors_of(folder) == [f"{path}:2:5: rule 'arabic' needs a department (or match: recipient_alias: true)"]


def test_yaml_syntax_error(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: x
            match: {language: ar
            department: general
        """)
    [error] = errors_of(folder)
    assert error.startswith(f"{path}:4:15: YAML syntax: ")


def test_duplicate_yaml_key(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: x
            match: {language: ar}
            department: general
            department: rights
        """)
    [error] = errors_of(folder)
    assert error.startswith(f"{path}:5:5: YAML syntax: ")
    assert 'found duplicate key "department"' in error


def test_section_in_two_files(folder: Path) -> None:
    path = write(folder, "zz-extra.yaml", """
        # someone pasted the policy twice
        policy:
          require_authentication: true
        """)
    assert errors_of(folder) == [
        f"{path}:2:1: section 'policy' is already defined at {folder / 'office.yaml'}:30:1"
    ]


def test_several_errors_are_all_reported(folder: Path) -> None:
    path = write(folder, "routing.yaml", """
        routing:
          - id: a
            match: {language: fr}
            department: general
          - id: b
            match: {kind: [spam]}
            priority: urgent
            department: general
        """)
    errors = errors_of(folder)
    assert errors == [
        f"{path}:3:23: routing.0.match.language: Input should be 'ar' or 'en' (got 'fr')",
        f"{path}:6:20: routing.1.match.kind.0: Input should be 'inquiry', 'followup', 'clerk_reply', "
        "'auto_reply', 'bulk' or 'bounce' (got 'spam')",
        f"{path}:7:15: routing.1.priority: Input should be 'normal' or 'high' (got 'urgent')",
    ]


def test_a_reloader_handed_the_rules_in_force_keeps_them_while_the_files_are_broken(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker restarted mid-edit starts with its daemon's rules, not with the broken files."""
    in_force = load_rules(folder)
    routing = folder / "routing.yaml"
    shipped = routing.read_text(encoding="utf-8")
    routing.write_text(shipped + "  - id: half-typed\n    match: {\n", encoding="utf-8")
    reloader = RulesReloader(folder, in_force)
    assert reloader.rules is in_force
    with caplog.at_level(logging.ERROR, logger="mailbot.rules"):
        assert reloader.reload_if_changed() is in_force
    assert len(caplog.messages) == 1 and "reload refused, rules in force kept" in caplog.messages[0]
    routing.write_text(shipped.replace("department-alias", "by-alias"), encoding="utf-8")
    assert reloader.reload_if_changed().routing[0].id == "by-alias"


def test_reload_applies_a_good_edit_and_refuses_a_bad_one(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloader = RulesReloader(folder)
    first = reloader.rules
    assert reloader.reload_if_changed() is first  # nothing changed: the same object
    routing = folder / "routing.yaml"
    shipped = routing.read_text(encoding="utf-8")
    good = shipped + ("  - id: courts\n    match: {sender_domain: [court.example]}\n"
                      "    department: rights\n    priority: high\n")
    routing.write_text(good, encoding="utf-8")
    second = reloader.reload_if_changed()
    assert second is not first
    assert [rule.id for rule in second.routing] == ["department-alias", "courts"]
    routing.write_text(good.replace("department: rights", "department: courts"), encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="mailbot.rules"):
        assert reloader.reload_if_changed() is second
    assert caplog.messages == [
        f"rules_dir={folder} reload refused, rules in force kept: {routing}:{len(shipped.splitlines()) + 3}:17: "
        "unknown department "
        "'courts' (expected rights, prisons, criminal, statements, governorates, completion, general)"
    ]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mailbot.rules"):
        assert reloader.reload_if_changed() is second  # logged once per bad version, not every 2 s
    assert caplog.messages == []
    routing.write_text(good.replace("priority: high", "priority: normal"), encoding="utf-8")
    assert reloader.reload_if_changed().routing[1].priority == "normal"


def test_cli_rules_check(folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["rules", "check", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {folder}: 7 departments, 6 statuses, 1 routing rules, ")
    path = write(folder, "routing.yaml", """
        routing:
          - id: x
            match: {language: ar}
            departmnt: general
        """)
    result = runner.invoke(cli, ["rules", "check", str(folder)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith(f"{path}:4:5: unknown key 'departmnt'")
    assert result.stderr.splitlines()[-1] == f"1 error(s) in {folder}"


def test_notifying_subscribers_off_the_record_is_off_by_default_and_must_be_a_boolean(folder: Path) -> None:
    assert load_rules(folder).policy.notify_subscribers_off_record is False
    office = folder / "office.yaml"
    office.write_text(office.read_text(encoding="utf-8").replace(
        "notify_subscribers_off_record: false", "notify_subscribers_off_record: sometimes"), encoding="utf-8")
    [error] = errors_of(folder)
    assert error.endswith("policy.notify_subscribers_off_record: Input should be a valid boolean, "
                          "unable to interpret input (got 'sometimes')")
