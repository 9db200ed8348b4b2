"""Logging: key=value text lines by default, JSON lines with MAILBOT_LOG_FORMAT=json."""

from __future__ import annotations

import json
import sys
import logging

import pytest

from mailbot.logs import JsonFormatter, setup_logging


def test_json_lines_carry_the_fields_of_the_message_and_the_traceback():
    log = logging.getLogger("mailbot.pipeline")
    try:
        raise ValueError("no such inquiry")
    except ValueError:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 1,
                                "message_id=%s mail=%s kind=%s failed: %s",
                                ("<a@b.example>", 42, "inquiry", "استفسار"), exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "ERROR" and entry["logger"] == "mailbot.pipeline"
    assert entry["message"] == "message_id=<a@b.example> mail=42 kind=inquiry failed: استفسار"
    assert entry["fields"] == {"message_id": "<a@b.example>", "mail": "42", "kind": "inquiry"}
    assert "ValueError: no such inquiry" in entry["error"]
    assert entry["time"].endswith("Z")


def test_setup_logging_json_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        logging.getLogger("mailbot.jobs").info("mailbot running smtp=%s", "127.0.0.1:2525")
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [json.loads(line)["fields"] for line in lines] == [{"smtp": "127.0.0.1:2525"}]
