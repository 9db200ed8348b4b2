"""Triage throughput against the stdlib email parser alone, on the same files, in the same run.

    .venv/bin/python scripts/bench_triage.py [--rounds N] [PATH ...]

Default files: every file of /work/shared/corpus/realworld and the sample mails.
Triage runs the whole pure path per file (read, parse, understand, route,
disclose) in this one process, with no transactions on file.  The baseline is
email.message_from_bytes(policy=default), walking the parts and getting each
part's content.  Prints messages/s for both and the ratio (target >= 0.3).
"""

from __future__ import annotations

import argparse
import email
import time
from email import policy
from email.errors import MessageError
from pathlib import Path

from mailbot.rules import load_rules
from mailbot.settings import SHIPPED_RULES
from mailbot.triage import mail_files, triage_file

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
DEFAULT_PATHS = [CORPUS / "realworld", CORPUS / "samples" / "mail"]


def stdlib_only(path: Path) -> None:
    message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    for part in message.walk():
        if part.is_multipart():
            continue
        try:
            part.get_content()
        except (LookupError, KeyError, ValueError, MessageError, AssertionError):
            # The stdlib refuses some real-world parts (unknown charsets, bad
            # headers); the work up to the refusal still counts.
            pass


def best_rate(files: list[Path], handle, rounds: int) -> float:  # noqa: ANN001 - any callable
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for path in files:
            handle(path)
        best = max(best, len(files) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=DEFAULT_PATHS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = list(mail_files(args.paths))
    rules = load_rules(SHIPPED_RULES)
    size = sum(p.stat().st_size for p in files)
    errors = sum(triage_file(p, rules, lambda numbers: {}).error is not None for p in files)  # warm-up
    baseline = best_rate(files, stdlib_only, args.rounds)
    triage = best_rate(files, lambda p: triage_file(p, rules, lambda numbers: {}), args.rounds)
    print(f"files: {len(files)} ({size / 1e6:.1f} MB), unparseable by triage: {errors}, best of {args.rounds} rounds")
    print(f"stdlib email parse+walk+get_content: {baseline:8.1f} messages/s")
    print(f"mailbot triage (parse+understand+route+disclose): {triage:8.1f} messages/s")
    print(f"ratio triage/stdlib: {triage / baseline:.2f} (target >= 0.30)")


if __name__ == "__main__":
    main()
