"""Logging setup: one line per event, key=value fields, UTC timestamps."""

from __future__ import annotations

import logging
import time


def setup_logging(level: str = "INFO") -> None:
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
