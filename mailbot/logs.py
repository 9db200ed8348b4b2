"""Logging setup: one line per event, key=value fields, UTC timestamps; JSON lines on request."""

from __future__ import annotations

import json
import logging
import re
import time

# message_id=<a@b> mail=42 kind=inquiry: the fields of mailbot's own log lines.
_FIELD = re.compile(r"(?:^|\s)([a-z_]+)=(\S+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, the message's key=value
    fields under ``fields``, and the traceback as ``error`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        fields = dict(_FIELD.findall(message))
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)sZ %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (every SMTP session, every scheduler tick) is noise at INFO.
    for noisy in ("mail.log", "apscheduler", "imapclient", "mailparser", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
