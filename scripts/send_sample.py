#!/usr/bin/env python3
"""Send one sample Arabic inquiry to the local SMTP ingress (the README's one-liner).

Uses MAILBOT_SMTP_LISTEN (default 127.0.0.1:2525) so it talks to the
`mailbot run` started with the same environment.  Prints the Message-ID sent.
"""

from __future__ import annotations

import os
import smtplib
import sys
from email.message import EmailMessage
from email.utils import make_msgid


def main() -> int:
    host, _, port = (os.environ.get("MAILBOT_SMTP_LISTEN") or "127.0.0.1:2525").rpartition(":")
    mail = EmailMessage()
    mail["From"] = "محمد العتيبي <citizen@example.com>"
    mail["To"] = "inquiries@emirate.example"
    mail["Subject"] = "استفسار عن معاملة"
    mail["Message-ID"] = make_msgid(domain="example.com")
    mail.set_content(
        "السلام عليكم ورحمة الله وبركاته،\n\n"
        "أرجو إفادتي عن حالة المعاملة رقم ١٤٤٦/٠٠٣٢١ المقدمة لإدارة الحقوق.\n\n"
        "وشكراً لكم\nمحمد العتيبي\n"
    )
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=30) as smtp:
            smtp.send_message(mail, from_addr="citizen@example.com", to_addrs=["inquiries@emirate.example"])
    except OSError as error:
        print(f"could not reach mailbot at {host}:{port}: {error} (is `mailbot run` running?)", file=sys.stderr)
        return 1
    print(f"sent {mail['Message-ID']} to {host}:{port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
